"""Every query gridtune makes, in one place: producer, workers and CLI call these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from gridtune.errors import UserError
from gridtune.sweep import SweepConfig, config_from_snapshot
from models.db import session_scope
from models.schema import Generation, RowState, Sweep, SweepState, utcnow


# --- sweeps -------------------------------------------------------------------------------------
def find_sweep(engine: Engine, name: str) -> Sweep | None:
    with session_scope(engine) as session:
        return session.scalar(select(Sweep).where(Sweep.name == name))


def get_sweep(engine: Engine, name: str) -> Sweep:
    sweep = find_sweep(engine, name)
    if sweep is None:
        with session_scope(engine) as session:
            known = session.scalars(select(Sweep.name).order_by(Sweep.id.desc()).limit(10)).all()
        hint = f" (known: {', '.join(known)})" if known else " (no sweeps yet: run `python -m producer sweep`)"
        raise UserError(f"no sweep named {name!r}{hint}")
    return sweep


def get_sweep_by_id(engine: Engine, sweep_id: int) -> Sweep:
    with session_scope(engine) as session:
        sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        raise LookupError(f"sweep {sweep_id} does not exist")
    return sweep


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


def sweep_config(sweep: Sweep) -> SweepConfig:
    return config_from_snapshot(sweep.config)


# --- generation rows ----------------------------------------------------------------------------
def insert_generation(engine: Engine, values: dict[str, Any]) -> bool:
    """Insert one row unless (sweep, request_index) already has one. True if this call inserted it."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(Generation)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["sweep_id", "request_index"])
        .returning(Generation.id)  # rowcount is not reliable here on psycopg; a returned id is
    )
    with session_scope(engine) as session:
        return session.execute(statement).scalar() is not None


def sweep_and_row(engine: Engine, sweep_id: int, index: int) -> tuple[Sweep, bool]:
    """The sweep and whether request `index` already has a row: one query, one round trip."""
    exists = (
        select(Generation.id)
        .where(Generation.sweep_id == sweep_id, Generation.request_index == index)
        .exists()
    )
    with session_scope(engine) as session:
        found = session.execute(select(Sweep, exists).where(Sweep.id == sweep_id)).first()
    if found is None:
        raise LookupError(f"sweep {sweep_id} does not exist")
    return found[0], bool(found[1])


def has_row(engine: Engine, sweep_id: int, index: int) -> bool:
    with session_scope(engine) as session:
        found = session.scalar(
            select(Generation.id).where(Generation.sweep_id == sweep_id, Generation.request_index == index)
        )
        return found is not None


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


def missing_indices(engine: Engine, sweep_id: int, total: int) -> Iterator[int]:
    """Request indices with no ok row, in order."""
    done = ok_indices(engine, sweep_id)
    return (index for index in range(total) if index not in done)


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
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
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
        ok, failed, truncated, limited, ptok, ctok, first, last = session.execute(
            base.add_columns(
                func.count().filter(Generation.state == RowState.OK),
                func.count().filter(Generation.state == RowState.FAILED),
                func.count().filter(Generation.finish_reason == "length"),
                func.coalesce(func.sum(Generation.rate_limited), 0),
                func.coalesce(func.sum(Generation.prompt_tokens), 0),
                func.coalesce(func.sum(Generation.completion_tokens), 0),
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
        rate_limited=int(limited),
        prompt_tokens=int(ptok),
        completion_tokens=int(ctok),
        first_finished=first,
        last_finished=last,
        errors=errors,
    )
