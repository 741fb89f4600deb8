"""The chord body may be delivered twice or fire with rows missing (docs/reliability.md §2).

The finalizer (`worker/dataset.py::finalize_sweep`) builds the dataset once: a second delivery
finds the sweep already claimed (`store.claim_finalizer`, one conditional UPDATE) and does
nothing; a chord that fires while requests have no row does nothing at all. Rows come from the
real SDK against the local server, as a worker stores them.
"""

from __future__ import annotations

import threading

import localapi
from gridtune.settings import Settings
from models import SweepState, session_scope, store
from models.schema import Dataset
from worker.context import WorkerContext
from worker.dataset import finalize_sweep
from worker.generation import run_request
from tests.unit.test_generation import CONFIG, new_sweep

FINALIZABLE = CONFIG + "[dataset]\nmin_examples = 1\nvalidation_fraction = 0\n"


def context(tmp_path, server, database_url=None) -> WorkerContext:
    return WorkerContext(Settings(
        DATABASE_URL=database_url or f"sqlite:///{tmp_path}/fin.db", OPENAI_API_KEY="sk-test-finalizer",
        OPENAI_BASE_URL=server.base_url, GRIDTUNE_DATA_DIR=str(tmp_path / "data"),
    ))


def datasets(ctx, sweep_id) -> list[Dataset]:
    from sqlalchemy import select

    with session_scope(ctx.engine) as session:
        return list(session.scalars(select(Dataset).where(Dataset.sweep_id == sweep_id)))


def test_a_second_delivery_of_the_chord_body_does_nothing(tmp_path):
    with localapi.running() as server:
        ctx = context(tmp_path, server)
        sweep = new_sweep(ctx, text=FINALIZABLE)
        for index in range(sweep.total_requests):
            run_request(ctx, sweep.id, index)

        first = finalize_sweep(ctx, sweep.id)
        assert first.state == SweepState.DATASET_READY and first.dataset_id is not None
        train = (tmp_path / "data" / sweep.name / "train.jsonl")
        written = train.read_bytes()

        again = finalize_sweep(ctx, sweep.id)  # the body delivered again
        assert again.state == "already_finalized" and again.dataset_id is None  # no second fine-tune
        stored = store.get_sweep_by_id(ctx.engine, sweep.id)
        assert stored.finalizer_runs == 1 and stored.state == SweepState.DATASET_READY
        assert [d.id for d in datasets(ctx, sweep.id)] == [first.dataset_id]
        assert train.read_bytes() == written


def test_concurrent_deliveries_claim_the_sweep_once(tmp_path, postgres_db):
    """Eight chord bodies at the same moment on PostgreSQL: exactly one claim wins."""
    with localapi.running() as server:
        ctx = context(tmp_path, server, database_url=postgres_db)
        sweep = new_sweep(ctx, text=FINALIZABLE)
        barrier, wins = threading.Barrier(8), []

        def claim():
            barrier.wait()
            wins.append(store.claim_finalizer(ctx.engine, sweep.id))

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(wins) == [False] * 7 + [True]
        stored = store.get_sweep_by_id(ctx.engine, sweep.id)
        assert stored.finalizer_runs == 1 and stored.state == SweepState.FINALIZING
        ctx.engine.dispose()


def test_an_incomplete_chord_does_nothing(tmp_path):
    """Rows missing (an interrupted enqueue, a lost broker): no claim, no dataset, no file."""
    with localapi.running() as server:
        ctx = context(tmp_path, server)
        sweep = new_sweep(ctx, text=FINALIZABLE)
        for index in range(sweep.total_requests - 1):  # the last request has no row
            run_request(ctx, sweep.id, index)

        result = finalize_sweep(ctx, sweep.id)
        assert result.state == "incomplete" and result.dataset_id is None and "1 requests" in result.message
        stored = store.get_sweep_by_id(ctx.engine, sweep.id)
        assert stored.finalizer_runs == 0 and stored.state == SweepState.RUNNING
        assert datasets(ctx, sweep.id) == []
        assert not (tmp_path / "data" / sweep.name).exists()

        # Once the missing row arrives (the resumed sweep's chord), the finalizer runs once.
        run_request(ctx, sweep.id, sweep.total_requests - 1)
        assert finalize_sweep(ctx, sweep.id).state == SweepState.DATASET_READY
        assert store.get_sweep_by_id(ctx.engine, sweep.id).finalizer_runs == 1
