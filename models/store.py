"""Every query gridtune makes, in one place: producer, workers and CLI call these."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterator, TypeVar

from sqlalchemy import JSON, Engine, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from gridtune.errors import UserError
from gridtune.sweep import SweepConfig, config_from_snapshot
from models.db import autocommit, describe_database, session_scope
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
    utcnow,
)

T = TypeVar("T")


# --- text a provider sends, made storable --------------------------------------------------------
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")  # lone surrogates and NUL


def storable(value: Any) -> Any:
    """`value` with every string made storable by both databases, recursively through dicts/lists.

    A provider can send text that is not valid Unicode for UTF-8 codecs (lone surrogates such as
    "\\ud800", decoded from JSON escapes) or NUL characters (PostgreSQL text refuses them). Each
    such character becomes U+FFFD, so a paid response is stored instead of failing as `internal`.
    """
    if isinstance(value, str):
        if value.isascii() and "\x00" not in value:
            return value
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def _fitted(table: Any, values: dict[str, Any]) -> dict[str, Any]:
    """storable() values, with strings cut to their column's length (a long invented finish_reason)."""
    lengths = _column_lengths(table)
    fitted = {}
    for name, value in values.items():
        value = storable(value)
        length = lengths.get(name)
        if length and isinstance(value, str) and len(value) > length:
            value = value[:length]
        fitted[name] = value
    return fitted


_lengths: dict[Any, dict[str, int | None]] = {}


def _column_lengths(table: Any) -> dict[str, int | None]:
    lengths = _lengths.get(table)
    if lengths is None:  # once per table: a column lookup per value per row showed in profiles
        lengths = _lengths[table] = {c.name: getattr(c.type, "length", None) for c in table.__table__.columns}
    return lengths


# --- sweeps -------------------------------------------------------------------------------------
def find_sweep(engine: Engine, name: str) -> Sweep | None:
    with session_scope(engine) as session:
        return session.scalar(select(Sweep).where(Sweep.name == name))


def get_sweep(engine: Engine, name: str) -> Sweep:
    sweep = find_sweep(engine, name)
    if sweep is None:
        with session_scope(engine) as session:
            known = session.scalars(select(Sweep.name).order_by(Sweep.id.desc()).limit(10)).all()
        hint = (f" (known: {', '.join(known)})" if known
                else " (no sweeps yet there: run `python -m producer sweep`, or set DATABASE_URL)")
        raise UserError(f"no sweep named {name!r} in {describe_database(engine)}{hint}")
    return sweep


def _get(engine: Engine, table: type[T], row_id: int, what: str) -> T:
    """The row `row_id` of `table`, or LookupError naming `what` was missing."""
    with session_scope(engine) as session:
        row = session.get(table, row_id)
    if row is None:
        raise LookupError(f"{what} {row_id} does not exist")
    return row


def _latest(engine: Engine, table: type[T], sweep_id: int) -> T | None:
    """The sweep's newest row of `table` (datasets and jobs: re-runs add new ones)."""
    with session_scope(engine) as session:
        return session.scalar(select(table).where(table.sweep_id == sweep_id).order_by(table.id.desc()).limit(1))


def get_sweep_by_id(engine: Engine, sweep_id: int) -> Sweep:
    return _get(engine, Sweep, sweep_id, "sweep")


def create_or_resume_sweep(
    engine: Engine, name: str, config: SweepConfig, *, replace_config: bool = False
) -> tuple[Sweep, bool]:
    """(sweep, created). A different config under an existing name is refused unless replace_config."""
    with session_scope(engine) as session:
        sweep = session.scalar(select(Sweep).where(Sweep.name == name))
        if sweep is None:
            sweep = Sweep(
                name=name,
                config=config.snapshot(),
                fingerprint=config.fingerprint,
                total_requests=config.total_requests,
                state=SweepState.RUNNING,
            )
            session.add(sweep)
            session.flush()
            return sweep, True
        if sweep.fingerprint != config.fingerprint:
            if not replace_config:
                raise UserError(
                    f"sweep {name!r} already exists with a different config; pick a new --name, or "
                    "pass --replace-config to resume it with this config (stored rows are kept)"
                )
            sweep.config = config.snapshot()
            sweep.fingerprint = config.fingerprint
            sweep.total_requests = config.total_requests
        return sweep, False


def mark_enqueued(engine: Engine, sweep_id: int) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id)
            .values(state=SweepState.RUNNING, stop_reason=None, enqueued_at=utcnow(), finished_at=None)
        )


def set_max_cost(engine: Engine, sweep_id: int, max_cost_usd: float | None) -> None:
    """Set (or raise, or lower) a sweep's spend cap in USD; None removes it."""
    with session_scope(engine) as session:
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(max_cost_usd=max_cost_usd))


def set_mode(engine: Engine, sweep_id: int, mode: str) -> None:
    """"online" or "batch": how the sweep's requests are sent from now on."""
    with session_scope(engine) as session:
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(mode=mode))


def stop_sweep(engine: Engine, sweep_id: int, reason: str) -> bool:
    """Stop a running sweep early (auth or quota failure). True if this call stopped it."""
    with session_scope(engine) as session:
        result = session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.state == SweepState.RUNNING)
            .values(state=SweepState.STOPPED, stop_reason=reason)
        )
        return result.rowcount == 1


def claim_finalizer(engine: Engine, sweep_id: int) -> bool:
    """Move the sweep into `finalizing`; only one caller ever wins (the chord body may be delivered twice)."""
    with session_scope(engine) as session:
        result = session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.state.in_([SweepState.RUNNING, SweepState.STOPPED]))
            .values(state=SweepState.FINALIZING, finalizer_runs=Sweep.finalizer_runs + 1)
        )
        return result.rowcount == 1


def set_sweep_state(engine: Engine, sweep_id: int, state: str, reason: str | None = None) -> None:
    values: dict[str, Any] = {"state": state}
    if reason is not None:
        values["stop_reason"] = reason
    if state in (SweepState.DONE, SweepState.FAILED, SweepState.DATASET_READY):
        values["finished_at"] = utcnow()
    with session_scope(engine) as session:
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(**values))


def list_sweeps(engine: Engine) -> list[Sweep]:
    with session_scope(engine) as session:
        return list(session.scalars(select(Sweep).order_by(Sweep.id)))


_configs: dict[tuple[int, str], SweepConfig] = {}


def sweep_config(sweep: Sweep | SweepHead) -> SweepConfig:
    """A stored sweep's config, parsed once per process and config version (its fingerprint)."""
    if isinstance(sweep, SweepHead):
        return sweep.parsed
    config = _configs.get((sweep.id, sweep.fingerprint))
    return config if config is not None else _remember_config(sweep.id, sweep.fingerprint, sweep.config)


def _remember_config(sweep_id: int, fingerprint: str, snapshot: dict[str, Any]) -> SweepConfig:
    if len(_configs) > 64:
        _configs.clear()
    config = _configs[(sweep_id, fingerprint)] = config_from_snapshot(snapshot)
    return config


# --- generation rows ----------------------------------------------------------------------------
def insert_generation(engine: Engine, values: dict[str, Any]) -> bool:
    """Insert one row unless (sweep, request_index) already has one. True if this call inserted it."""
    # One Core statement per dialect, values bound at execution: SQLAlchemy compiles it once per
    # set of columns (cached), where an ORM insert with .values() was rebuilt for every row.
    with autocommit(engine).connect() as conn:  # one statement: no BEGIN/COMMIT round trips
        return conn.execute(_insert_or_ignore(engine.dialect.name), _fitted(Generation, values)).scalar() is not None


_insert_statements: dict[str, Any] = {}


def _insert_or_ignore(dialect_name: str):
    statement = _insert_statements.get(dialect_name)
    if statement is None:
        dialect = postgresql if dialect_name == "postgresql" else sqlite
        statement = _insert_statements[dialect_name] = (
            dialect.insert(Generation.__table__)
            .on_conflict_do_nothing(index_elements=["sweep_id", "request_index"])
            .returning(Generation.__table__.c.id)  # rowcount is not reliable here on psycopg; a returned id is
        )
    return statement


def insert_generations(engine: Engine, rows: list[dict[str, Any]], chunk: int = 1000) -> int:
    """Insert many rows, skipping requests that already have one. Returns how many were inserted."""
    if not rows:
        return 0
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    columns = sorted({key for row in rows for key in row})
    rows = [row if len(row) == len(columns) else {key: row.get(key) for key in columns} for row in rows]
    if dialect is postgresql:
        return _insert_generations_pg(engine, columns, rows, chunk)
    # executemany (SQLAlchemy batches it as "insertmanyvalues"): one compiled statement, where a
    # multi-row .values() would be compiled anew for every chunk (slower than the inserts).
    statement = (
        dialect.insert(Generation.__table__)
        .on_conflict_do_nothing(index_elements=["sweep_id", "request_index"])
        .returning(Generation.__table__.c.id)
    )
    inserted = 0
    for start in range(0, len(rows), chunk):
        with engine.begin() as conn:
            inserted += len(conn.execute(statement, rows[start:start + chunk]).all())
    return inserted


def _insert_generations_pg(engine: Engine, columns: list[str], rows: list[dict[str, Any]], chunk: int) -> int:
    # psycopg's executemany (pipelined, one prepared statement) is about 4x faster here than
    # SQLAlchemy's insertmanyvalues, whose long multi-row statements psycopg re-parses each time.
    from psycopg.types.json import Json

    json_columns = {c.name for c in Generation.__table__.columns if isinstance(c.type, JSON)}
    quoted = ", ".join(f'"{name}"' for name in columns)
    sql = (f"INSERT INTO generations ({quoted}) VALUES ({', '.join(['%s'] * len(columns))}) "
           "ON CONFLICT (sweep_id, request_index) DO NOTHING")
    inserted = 0
    for start in range(0, len(rows), chunk):
        values = [tuple(Json(row[name]) if name in json_columns and row[name] is not None else row[name]
                        for name in columns) for row in rows[start:start + chunk]]
        with engine.begin() as conn:
            inserted += max(0, conn.exec_driver_sql(sql, values).rowcount)
    return inserted


@dataclass(frozen=True)
class SweepHead:
    """What a worker reads of a sweep for each request: the `sweeps` columns it uses, without the
    config JSON (parsed once per process and fingerprint: `parsed`)."""

    id: int
    name: str
    state: str
    stop_reason: str | None
    max_cost_usd: float | None
    created_at: datetime | None
    enqueued_at: datetime | None
    fingerprint: str
    parsed: SweepConfig


_HEAD_COLUMNS = ("id", "name", "state", "stop_reason", "max_cost_usd", "created_at", "enqueued_at", "fingerprint")
_head_statement: Any = None


def sweep_and_row(engine: Engine, sweep_id: int, index: int) -> tuple[SweepHead, bool]:
    """The sweep and whether request `index` already has a row: one query, one round trip (a
    second one only the first time a process meets this config). LookupError if no such sweep."""
    global _head_statement
    if _head_statement is None:  # built once; Core, not ORM: no identity map, no config JSON per row
        table, rows = Sweep.__table__, Generation.__table__
        exists = (select(rows.c.id)
                  .where(rows.c.sweep_id == bindparam("sweep_id"), rows.c.request_index == bindparam("index"))
                  .exists())
        _head_statement = select(*(table.c[name] for name in _HEAD_COLUMNS), exists).where(
            table.c.id == bindparam("sweep_id"))
    with autocommit(engine).connect() as conn:  # reads only: no BEGIN/ROLLBACK round trips
        found = conn.execute(_head_statement, {"sweep_id": sweep_id, "index": index}).first()
        if found is None:
            raise LookupError(f"sweep {sweep_id} does not exist")
        head = dict(zip(_HEAD_COLUMNS, found[:-1]))
        parsed = _configs.get((sweep_id, head["fingerprint"]))
        if parsed is None:
            snapshot = conn.execute(select(Sweep.__table__.c.config).where(Sweep.__table__.c.id == sweep_id)).scalar()
            parsed = _remember_config(sweep_id, head["fingerprint"], snapshot)
    return SweepHead(**head, parsed=parsed), bool(found[-1])


def ok_indices(engine: Engine, sweep_id: int) -> set[int]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(Generation.request_index).where(
                Generation.sweep_id == sweep_id, Generation.state == RowState.OK
            )
        )
        return {index for (index,) in rows}


def forget_failed_rows(engine: Engine, sweep_id: int) -> int:
    """Resume retries failed requests: their rows go so the new tasks may write fresh ones."""
    with session_scope(engine) as session:
        result = session.execute(
            delete(Generation).where(Generation.sweep_id == sweep_id, Generation.state != RowState.OK)
        )
        return result.rowcount


def iter_rows(engine: Engine, sweep_id: int, *, state: str | None = None, batch: int = 2000) -> Iterator[Generation]:
    """Stream a sweep's rows in request order without loading them all."""
    last = -1
    while True:
        query = select(Generation).where(Generation.sweep_id == sweep_id, Generation.request_index > last)
        if state is not None:
            query = query.where(Generation.state == state)
        with session_scope(engine) as session:
            page = list(session.scalars(query.order_by(Generation.request_index).limit(batch)))
        if not page:
            return
        yield from page
        last = page[-1].request_index


@dataclass(frozen=True)
class SweepCounts:
    total: int
    ok: int
    failed: int
    truncated: int
    incomplete: int  # ok rows whose answer is not whole (any finish_reason but "stop"), truncated included
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float  # the stored cost of priced rows
    unpriced_prompt_tokens: int  # tokens of rows stored without a cost (an unpriced model, older rows)
    unpriced_completion_tokens: int
    first_finished: datetime | None
    last_finished: datetime | None
    errors: dict[str, int]

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def missing(self) -> int:
        return self.total - self.done


def sweep_counts(engine: Engine, sweep: Sweep) -> SweepCounts:
    with session_scope(engine) as session:
        base = select().select_from(Generation).where(Generation.sweep_id == sweep.id)
        ok, failed, truncated, incomplete, limited, ptok, ctok, cost, uptok, uctok, first, last = session.execute(
            base.add_columns(
                func.count().filter(Generation.state == RowState.OK),
                func.count().filter(Generation.state == RowState.FAILED),
                func.count().filter(Generation.finish_reason == "length"),
                # worker.dataset.COMPLETE_FINISH_REASONS: only "stop" (or none at all) is whole
                func.count().filter(Generation.state == RowState.OK, Generation.finish_reason.is_not(None),
                                    Generation.finish_reason != "stop"),
                func.coalesce(func.sum(Generation.rate_limited), 0),
                func.coalesce(func.sum(Generation.prompt_tokens), 0),
                func.coalesce(func.sum(Generation.completion_tokens), 0),
                func.coalesce(func.sum(Generation.cost_usd), 0.0),
                func.coalesce(func.sum(Generation.prompt_tokens).filter(Generation.cost_usd.is_(None)), 0),
                func.coalesce(func.sum(Generation.completion_tokens).filter(Generation.cost_usd.is_(None)), 0),
                func.min(Generation.finished_at),
                func.max(Generation.finished_at),
            )
        ).one()
        errors = dict(
            session.execute(
                select(Generation.error_kind, func.count())
                .where(Generation.sweep_id == sweep.id, Generation.state == RowState.FAILED)
                .group_by(Generation.error_kind)
                .order_by(func.count().desc())
                .limit(5)
            ).all()
        )
    return SweepCounts(
        total=sweep.total_requests,
        ok=ok,
        failed=failed,
        truncated=truncated,
        incomplete=incomplete,
        rate_limited=int(limited),
        prompt_tokens=int(ptok),
        completion_tokens=int(ctok),
        cost_usd=float(cost),
        unpriced_prompt_tokens=int(uptok),
        unpriced_completion_tokens=int(uctok),
        first_finished=first,
        last_finished=last,
        errors=errors,
    )


# --- batches (batch mode) -------------------------------------------------------------------------
def add_batches(engine: Engine, sweep_id: int, chunks: list[list[list[int]]]) -> list[int]:
    """One pending batch per chunk of [start, stop) index ranges; returns their ids."""
    with session_scope(engine) as session:
        batches = [Batch(sweep_id=sweep_id, ranges=ranges, request_count=sum(b - a for a, b in ranges),
                         status=BatchState.PENDING) for ranges in chunks]
        session.add_all(batches)
        session.flush()
        return [b.id for b in batches]


def get_batch(engine: Engine, batch_id: int) -> Batch:
    return _get(engine, Batch, batch_id, "batch")


def open_batches(engine: Engine, sweep_id: int) -> list[Batch]:
    """The sweep's batches whose rows are not all stored yet (pending, or in flight at the provider)."""
    with session_scope(engine) as session:
        return list(session.scalars(select(Batch).where(Batch.sweep_id == sweep_id, Batch.ingested_at.is_(None))
                                    .order_by(Batch.id)))


def update_batch(engine: Engine, batch_id: int, *, unless_set: str | None = None, **values: Any) -> bool:
    """Change a batch; with `unless_set`, only if that column is still NULL. True if it changed."""
    query = update(Batch).where(Batch.id == batch_id)
    if unless_set is not None:
        query = query.where(getattr(Batch, unless_set).is_(None))
    with session_scope(engine) as session:
        return session.execute(query.values(**values)).rowcount == 1


def batch_states(engine: Engine, sweep_id: int) -> dict[str, int]:
    """How many of the sweep's batches are in each status ("ingested" once their rows are stored)."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(Batch.status, Batch.ingested_at.is_not(None), func.count())
            .where(Batch.sweep_id == sweep_id).group_by(Batch.status, Batch.ingested_at.is_not(None))
        ).all()
    states: dict[str, int] = {}
    for status, ingested, count in rows:
        key = "ingested" if ingested else status
        states[key] = states.get(key, 0) + count
    return states


def output_history(engine: Engine, model: str, *, exclude: str | None = None) -> tuple[int, int, list[str]]:
    """Completion tokens of earlier sweeps of `model` (by the configured `[model] name`).

    Returns (ok rows with usage, their completion tokens in all, the sweeps' names); `exclude`
    leaves out one sweep by name. Feeds the pre-flight estimate's expected output.
    """
    sweeps = [s for s in list_sweeps(engine)
              if (s.config.get("model") or {}).get("name") == model and s.name != exclude]
    if not sweeps:
        return 0, 0, []
    with session_scope(engine) as session:
        rows, tokens = session.execute(
            select(func.count(), func.coalesce(func.sum(Generation.completion_tokens), 0)).where(
                Generation.sweep_id.in_([s.id for s in sweeps]), Generation.state == RowState.OK,
                Generation.completion_tokens.is_not(None))
        ).one()
    return int(rows), int(tokens), [s.name for s in sweeps]


# === the fine-tune step: datasets, jobs and their events ===========================================
ERROR_STATUSES = frozenset({JobStatus.FAILED, JobStatus.UNAVAILABLE})


# --- datasets -----------------------------------------------------------------------------------
def get_dataset(engine: Engine, dataset_id: int) -> Dataset:
    return _get(engine, Dataset, dataset_id, "dataset")


def latest_dataset(engine: Engine, sweep_id: int) -> Dataset | None:
    return _latest(engine, Dataset, sweep_id)


# --- jobs ---------------------------------------------------------------------------------------
def create_job(engine: Engine, sweep_id: int, dataset_id: int, backend: str, base_model: str) -> FinetuneJob:
    with session_scope(engine) as session:
        job = FinetuneJob(sweep_id=sweep_id, dataset_id=dataset_id, backend=backend, base_model=base_model,
                          status=JobStatus.PENDING)
        session.add(job)
        session.flush()
        session.add(FinetuneEvent(job_id=job.id, message=f"job created ({backend}, {base_model})",
                                  data={"type": "status", "status": JobStatus.PENDING}))
    return job


def get_job(engine: Engine, job_id: int) -> FinetuneJob:
    return _get(engine, FinetuneJob, job_id, "fine-tune job")


def latest_job(engine: Engine, sweep_id: int) -> FinetuneJob | None:
    return _latest(engine, FinetuneJob, sweep_id)


def active_job(engine: Engine, sweep_id: int, dataset_id: int) -> FinetuneJob | None:
    """The unfinished job on this dataset, if any: submitting again continues it instead of paying twice."""
    with session_scope(engine) as session:
        return session.scalar(
            select(FinetuneJob)
            .where(FinetuneJob.sweep_id == sweep_id, FinetuneJob.dataset_id == dataset_id,
                   FinetuneJob.status.not_in(JobStatus.FINAL))
            .order_by(FinetuneJob.id.desc())
            .limit(1)
        )


def list_jobs(engine: Engine) -> list[tuple[FinetuneJob, str]]:
    """Every job with its sweep's name, oldest first."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(FinetuneJob, Sweep.name).join(Sweep, Sweep.id == FinetuneJob.sweep_id).order_by(FinetuneJob.id)
        ).all()
    return [(job, name) for job, name in rows]


def update_job(engine: Engine, job_id: int, **values: Any) -> None:
    with session_scope(engine) as session:
        session.execute(update(FinetuneJob).where(FinetuneJob.id == job_id).values(**_fitted(FinetuneJob, values)))


def set_status(engine: Engine, job_id: int, status: str, detail: str | None = None, **values: Any) -> FinetuneJob:
    """Change a job's status (and other columns); a change is an event; a final status ends the sweep."""
    values = _fitted(FinetuneJob, values)
    detail = storable(detail or values.get("error_message"))
    with session_scope(engine) as session:
        job = session.get(FinetuneJob, job_id, with_for_update=True)
        previous = job.status
        for name, value in values.items():
            setattr(job, name, value)
        job.status = status
        if status != previous or detail:
            message = f"status: {previous} -> {status}" if status != previous else f"status: {status}"
            session.add(FinetuneEvent(
                job_id=job_id,
                level="error" if status in ERROR_STATUSES else "info",
                message=f"{message}: {detail}" if detail else message,
                data={"type": "status", "status": status},
            ))
        if status in JobStatus.FINAL and job.finished_at is None:
            job.finished_at = utcnow()
        sweep_id = job.sweep_id
    if status in JobStatus.FINAL and not _has_active_job(engine, sweep_id):
        set_sweep_state(engine, sweep_id, SweepState.DONE)
    return job


def _has_active_job(engine: Engine, sweep_id: int) -> bool:
    with session_scope(engine) as session:
        return session.scalar(
            select(FinetuneJob.id).where(FinetuneJob.sweep_id == sweep_id, FinetuneJob.status.not_in(JobStatus.FINAL))
        ) is not None


def claim_local(engine: Engine, job_id: int, stale_after: float) -> bool:
    """Take a local job for training: a queued one, or a running one whose trainer stopped beating."""
    cutoff = utcnow() - timedelta(seconds=stale_after)
    with session_scope(engine) as session:
        result = session.execute(
            update(FinetuneJob)
            .where(FinetuneJob.id == job_id, or_(
                FinetuneJob.status.in_([JobStatus.PENDING, JobStatus.QUEUED]),
                and_(FinetuneJob.status == JobStatus.RUNNING, FinetuneJob.updated_at < cutoff),
            ))
            .values(status=JobStatus.RUNNING, updated_at=utcnow())
        )
        claimed = result.rowcount == 1
        if claimed:
            session.add(FinetuneEvent(job_id=job_id, message="status: training started on this machine",
                                      data={"type": "status", "status": JobStatus.RUNNING}))
        return claimed


def heartbeat(engine: Engine, job_id: int) -> None:
    """A live local trainer says so; claim_local treats a long silence as a dead worker."""
    update_job(engine, job_id, updated_at=utcnow())


# --- events -------------------------------------------------------------------------------------
def add_event(
    engine: Engine,
    job_id: int,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
    provider_event_id: str | None = None,
    created_at: datetime | None = None,
) -> bool:
    """Store one event; a provider event already stored (same provider id) is skipped. True if stored."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(FinetuneEvent)
        .values(**_fitted(FinetuneEvent, dict(
            job_id=job_id, message=message, level=level, data=data, provider_event_id=provider_event_id,
            created_at=created_at or utcnow())))
        .on_conflict_do_nothing(index_elements=["job_id", "provider_event_id"])
        .returning(FinetuneEvent.id)
    )
    with session_scope(engine) as session:
        return session.execute(statement).scalar() is not None


def provider_event_ids(engine: Engine, job_id: int) -> set[str]:
    with session_scope(engine) as session:
        rows = session.scalars(
            select(FinetuneEvent.provider_event_id).where(
                FinetuneEvent.job_id == job_id, FinetuneEvent.provider_event_id.is_not(None))
        )
        return set(rows)


def events_after(engine: Engine, job_id: int, after_id: int = 0) -> list[FinetuneEvent]:
    with session_scope(engine) as session:
        return list(session.scalars(
            select(FinetuneEvent).where(FinetuneEvent.job_id == job_id, FinetuneEvent.id > after_id)
            .order_by(FinetuneEvent.id)
        ))


def last_event(engine: Engine, job_id: int) -> FinetuneEvent | None:
    with session_scope(engine) as session:
        return session.scalar(
            select(FinetuneEvent).where(FinetuneEvent.job_id == job_id).order_by(FinetuneEvent.id.desc()).limit(1)
        )
