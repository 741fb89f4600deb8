"""Queries of `python -m producer eval` (issue 9): eval runs, their answers and judgements.

Kept apart from models/store.py (the sweep hot path); the same rules: insert-or-ignore on the
unique keys, so a redelivered task never stores a second row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from models.db import session_scope
from models.schema import EvalAnswer, EvalJudgement, EvalRun, EvalState, RowState, utcnow
from models.store import _fitted


def find_run(engine: Engine, sweep_id: int, job_id: int) -> EvalRun | None:
    with session_scope(engine) as session:
        return session.scalars(select(EvalRun).where(EvalRun.sweep_id == sweep_id, EvalRun.job_id == job_id)).first()


def latest_run(engine: Engine, sweep_id: int) -> EvalRun | None:
    with session_scope(engine) as session:
        return session.scalars(select(EvalRun).where(EvalRun.sweep_id == sweep_id)
                               .order_by(EvalRun.id.desc()).limit(1)).first()


def get_run(engine: Engine, eval_id: int) -> EvalRun:
    with session_scope(engine) as session:
        run = session.get(EvalRun, eval_id)
    if run is None:
        raise LookupError(f"eval run {eval_id} does not exist")
    return run


def create_run(engine: Engine, values: dict[str, Any]) -> EvalRun:
    """Insert the run for (sweep, job) unless one exists (two producers at once); return the stored one."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(EvalRun).values(**values).on_conflict_do_nothing(
        index_elements=["sweep_id", "job_id"])
    with session_scope(engine) as session:
        session.execute(statement)
    return find_run(engine, values["sweep_id"], values["job_id"])


def _insert(engine: Engine, table, keys: list[str], values: dict[str, Any]) -> bool:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = (dialect.insert(table).values(**_fitted(table, values))
                 .on_conflict_do_nothing(index_elements=keys).returning(table.id))
    with session_scope(engine) as session:
        return session.execute(statement).scalar() is not None


def insert_answer(engine: Engine, values: dict[str, Any]) -> bool:
    """One answer unless (eval_id, item_index, side) has one; True if this call stored it."""
    return _insert(engine, EvalAnswer, ["eval_id", "item_index", "side"], values)


def insert_judgement(engine: Engine, values: dict[str, Any]) -> bool:
    """One verdict unless (eval_id, item_index, position) has one; True if this call stored it."""
    return _insert(engine, EvalJudgement, ["eval_id", "item_index", "position"], values)


def has_answer(engine: Engine, eval_id: int, item_index: int, side: str) -> bool:
    with session_scope(engine) as session:
        return session.scalar(select(EvalAnswer.id).where(
            EvalAnswer.eval_id == eval_id, EvalAnswer.item_index == item_index, EvalAnswer.side == side)) is not None


def has_judgement(engine: Engine, eval_id: int, item_index: int, position: str) -> bool:
    with session_scope(engine) as session:
        return session.scalar(select(EvalJudgement.id).where(
            EvalJudgement.eval_id == eval_id, EvalJudgement.item_index == item_index,
            EvalJudgement.position == position)) is not None


def answers(engine: Engine, eval_id: int) -> list[EvalAnswer]:
    with session_scope(engine) as session:
        return list(session.scalars(select(EvalAnswer).where(EvalAnswer.eval_id == eval_id)
                                    .order_by(EvalAnswer.item_index, EvalAnswer.side)))


def judgements(engine: Engine, eval_id: int) -> list[EvalJudgement]:
    with session_scope(engine) as session:
        return list(session.scalars(select(EvalJudgement).where(EvalJudgement.eval_id == eval_id)
                                    .order_by(EvalJudgement.item_index, EvalJudgement.position)))


def forget_failed(engine: Engine, eval_id: int) -> int:
    """A re-run retries what failed: failed answers and verdicts (and the verdicts built on a failed
    answer) go, so new tasks may store fresh rows. Returns how many rows went."""
    with session_scope(engine) as session:
        failed_items = select(EvalAnswer.item_index).where(EvalAnswer.eval_id == eval_id,
                                                           EvalAnswer.state != RowState.OK)
        gone = session.execute(delete(EvalJudgement).where(
            EvalJudgement.eval_id == eval_id,
            (EvalJudgement.state != RowState.OK) | EvalJudgement.item_index.in_(failed_items))).rowcount
        gone += session.execute(delete(EvalAnswer).where(EvalAnswer.eval_id == eval_id,
                                                         EvalAnswer.state != RowState.OK)).rowcount
        return gone


def set_state(engine: Engine, eval_id: int, state: str, **values: Any) -> None:
    with session_scope(engine) as session:
        session.execute(update(EvalRun).where(EvalRun.id == eval_id).values(state=state, **values))


def claim_finalizer(engine: Engine, eval_id: int) -> bool:
    """Atomically take the eval's finalizer (judging -> scoring); False if another run has it or had it."""
    with session_scope(engine) as session:
        result = session.execute(update(EvalRun).where(EvalRun.id == eval_id, EvalRun.state == EvalState.JUDGING)
                                 .values(state=EvalState.SCORING, finalizer_runs=EvalRun.finalizer_runs + 1))
        return result.rowcount == 1


def finish(engine: Engine, eval_id: int, validation_loss: dict[str, Any] | None) -> None:
    set_state(engine, eval_id, EvalState.DONE, validation_loss=validation_loss, finished_at=utcnow())
