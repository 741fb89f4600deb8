"""The fine-tune step's queries: jobs, their events, and the datasets they train on."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from models import Dataset, FinetuneEvent, FinetuneJob, JobStatus, Sweep, SweepState, session_scope, store
from models.schema import utcnow

ERROR_STATUSES = frozenset({JobStatus.FAILED, JobStatus.UNAVAILABLE})


# --- datasets -----------------------------------------------------------------------------------
def get_dataset(engine: Engine, dataset_id: int) -> Dataset:
    with session_scope(engine) as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise LookupError(f"dataset {dataset_id} does not exist")
    return dataset


def latest_dataset(engine: Engine, sweep_id: int) -> Dataset | None:
    with session_scope(engine) as session:
        return session.scalar(select(Dataset).where(Dataset.sweep_id == sweep_id).order_by(Dataset.id.desc()).limit(1))


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
    with session_scope(engine) as session:
        job = session.get(FinetuneJob, job_id)
    if job is None:
        raise LookupError(f"fine-tune job {job_id} does not exist")
    return job


def latest_job(engine: Engine, sweep_id: int) -> FinetuneJob | None:
    with session_scope(engine) as session:
        return session.scalar(
            select(FinetuneJob).where(FinetuneJob.sweep_id == sweep_id).order_by(FinetuneJob.id.desc()).limit(1)
        )


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
        session.execute(update(FinetuneJob).where(FinetuneJob.id == job_id).values(**values))


def set_status(engine: Engine, job_id: int, status: str, detail: str | None = None, **values: Any) -> FinetuneJob:
    """Change a job's status (and other columns); a change is an event; a final status ends the sweep."""
    detail = detail or values.get("error_message")
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
        store.set_sweep_state(engine, sweep_id, SweepState.DONE)
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
        .values(job_id=job_id, message=message, level=level, data=data, provider_event_id=provider_event_id,
                created_at=created_at or utcnow())
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
