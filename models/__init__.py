"""gridtune's database: typed SQLAlchemy 2 models (schema), engines (db) and every query (store)."""

from models.db import dispose_engines, get_engine, session_scope
from models.schema import (
    Batch,
    BatchState,
    Dataset,
    FinetuneEvent,
    FinetuneJob,
    Generation,
    JobStatus,
    RowState,
    Sweep,
    SweepState,
)

__all__ = [
    "Batch", "BatchState", "Dataset", "FinetuneEvent", "FinetuneJob", "Generation", "JobStatus", "RowState", "Sweep",
    "SweepState", "dispose_engines", "get_engine", "session_scope",
]
