"""The tables: sweeps, one generation row per request, datasets, fine-tune jobs and their events."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class SweepState:
    RUNNING = "running"            # requests enqueued, rows arriving
    STOPPED = "stopped"            # an auth/quota failure stopped it early; see stop_reason
    FINALIZING = "finalizing"      # the chord body holds it
    DATASET_READY = "dataset_ready"
    FINETUNING = "finetuning"
    DONE = "done"                  # the fine-tune step ended (see the job for how)
    FAILED = "failed"              # the finalizer could not build a usable dataset


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict[str, Any]]
    fingerprint: Mapped[str] = mapped_column(String(64))
    total_requests: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(32), default=SweepState.RUNNING)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    # How many times the finalizer actually built a dataset (a guard, and what tests count).
    finalizer_runs: Mapped[int] = mapped_column(Integer, default=0)
    # The spend cap in USD (--max-cost / [model] max_cost_usd); None = no cap.
    max_cost_usd: Mapped[float | None] = mapped_column(Float)
    # "online" or "batch" (--batch / [model] mode); None = online (sweeps stored before batch mode).
    mode: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    enqueued_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    generations: Mapped[list[Generation]] = relationship(back_populates="sweep", lazy="raise")


class RowState:
    OK = "ok"
    FAILED = "failed"


class Generation(Base):
    """Exactly one row per (sweep, request index): the unique key makes redelivery harmless."""

    __tablename__ = "generations"
    __table_args__ = (
        UniqueConstraint("sweep_id", "request_index", name="uq_generation_request"),
        Index("ix_generation_sweep_state", "sweep_id", "state"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    request_index: Mapped[int] = mapped_column(BigInteger)
    repeat: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]]
    prompt: Mapped[str] = mapped_column(Text)
    input_text: Mapped[str] = mapped_column(Text)
    response_text: Mapped[str | None] = mapped_column(Text)
    # The provider's refusal text (`message.refusal`), kept even when it also sent some content.
    refusal: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    # What the request cost in USD at the price table's price when it was stored; None = unpriced.
    cost_usd: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    rate_limited: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    # A short class for grouping (auth, quota, bad_request, server_error, ...) and the full reason.
    error_kind: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)

    sweep: Mapped[Sweep] = relationship(back_populates="generations", lazy="raise")


class BatchState:
    """A batch's `status`: "pending" until the provider has it, then the provider's own statuses."""

    PENDING = "pending"
    FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class Batch(Base):
    """One provider batch of a sweep: which requests it carries and where it stands.

    `ranges` lists the request indices as [start, stop) pairs. `ingested_at` is set once every
    request of it has a row (or was handed to a new batch after expiry).
    """

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    ranges: Mapped[list[Any]] = mapped_column(JSON)
    request_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default=BatchState.PENDING)
    provider_batch_id: Mapped[str | None] = mapped_column(String(200))
    input_file_id: Mapped[str | None] = mapped_column(String(200))
    output_file_id: Mapped[str | None] = mapped_column(String(200))
    error_file_id: Mapped[str | None] = mapped_column(String(200))
    completed: Mapped[int | None] = mapped_column(Integer)
    failed: Mapped[int | None] = mapped_column(Integer)
    reserved_usd: Mapped[float | None] = mapped_column(Float)  # the spend cap's reservation while in flight
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    ingested_at: Mapped[datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    train_path: Mapped[str] = mapped_column(Text)
    validation_path: Mapped[str | None] = mapped_column(Text)
    legacy_path: Mapped[str | None] = mapped_column(Text)
    train_examples: Mapped[int] = mapped_column(Integer)
    validation_examples: Mapped[int] = mapped_column(Integer)
    train_tokens: Mapped[int] = mapped_column(BigInteger)
    validation_tokens: Mapped[int] = mapped_column(BigInteger)
    train_sha256: Mapped[str] = mapped_column(String(64))
    validation_sha256: Mapped[str | None] = mapped_column(String(64))
    # What was left out and why: {"failed": n, "truncated": n, "duplicates": n, "too_long": n}
    dropped: Mapped[dict[str, Any]]
    encoding: Mapped[str] = mapped_column(String(32))
    # Distinct inputs with a whole answer, and those answered more than once always identically
    # (a server that ignores sampling settings).
    inputs: Mapped[int | None] = mapped_column(Integer)
    identical_inputs: Mapped[int | None] = mapped_column(Integer)
    # The dataset report (worker/dataset_report.py: per-cell coverage, lengths, duplicates,
    # refusal-like answers, tokens and cost), the same JSON as report.json beside train.jsonl.
    report: Mapped[dict[str, Any] | None]


class JobStatus:
    PENDING = "pending"  # recorded, not yet accepted by the backend
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"  # the provider refused fine-tuning (403 training_not_available)
    SKIPPED = "skipped"  # backend "none"

    FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, UNAVAILABLE, SKIPPED})


class FinetuneJob(Base):
    __tablename__ = "finetune_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    backend: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.PENDING)
    provider_job_id: Mapped[str | None] = mapped_column(String(200))
    training_file_id: Mapped[str | None] = mapped_column(String(200))
    validation_file_id: Mapped[str | None] = mapped_column(String(200))
    fine_tuned_model: Mapped[str | None] = mapped_column(Text)  # remote model id or local adapter path
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # Local backend: mean token cross-entropy (nats) of the reply tokens; the training loss of the
    # last logged steps, the validation set's before training (the base model) and after.
    train_loss: Mapped[float | None] = mapped_column(Float)
    validation_loss_before: Mapped[float | None] = mapped_column(Float)
    validation_loss_after: Mapped[float | None] = mapped_column(Float)
    estimated_tokens: Mapped[int | None] = mapped_column(BigInteger)
    estimated_cost_usd: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]


class FinetuneEvent(Base):
    """A status change, a provider event or a local training step (step, loss in `data`)."""

    __tablename__ = "finetune_events"
    __table_args__ = (UniqueConstraint("job_id", "provider_event_id", name="uq_finetune_event"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("finetune_jobs.id", ondelete="CASCADE"), index=True)
    provider_event_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


# --- issue 9: `python -m producer eval` -------------------------------------------------------------
class EvalState:
    ANSWERING = "answering"  # base and tuned answers being stored
    JUDGING = "judging"      # the judge's verdicts being stored
    SCORING = "scoring"      # the eval finalizer holds it (validation losses of the local backend)
    DONE = "done"            # metrics are complete (the eval finalizer ran)


class EvalRun(Base):
    """One evaluation of a sweep's tuned model against its base: at most one per (sweep, job).

    `items` fixes what is asked, in order: [{"input", "cell", "source", "references"}]; the
    answer and judgement rows point into it by `item_index`.
    """

    __tablename__ = "eval_runs"
    __table_args__ = (UniqueConstraint("sweep_id", "job_id", name="uq_eval_run"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("finetune_jobs.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), default=EvalState.ANSWERING)
    base_model: Mapped[str] = mapped_column(Text)
    tuned_model: Mapped[str] = mapped_column(Text)
    judge_model: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict[str, Any]]  # the [eval] section it ran with
    items: Mapped[list[Any]] = mapped_column(JSON)
    # {"overall": {"base": x, "tuned": y}, "cells": {cell key: {...}}, "source": "local" | "provider"}
    validation_loss: Mapped[dict[str, Any] | None]
    finalizer_runs: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class EvalAnswer(Base):
    """One model's answer to one eval item: exactly one row per (run, item, side)."""

    __tablename__ = "eval_answers"
    __table_args__ = (UniqueConstraint("eval_id", "item_index", "side", name="uq_eval_answer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    eval_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    item_index: Mapped[int] = mapped_column(Integer)
    side: Mapped[str] = mapped_column(String(8))  # "base" or "tuned"
    state: Mapped[str] = mapped_column(String(16))  # RowState
    text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    error_kind: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalJudgement(Base):
    """One verdict of the pairwise judge: exactly one row per (run, item, order).

    `position` is "base_first" (base is answer A) or "tuned_first"; `winner` is "base", "tuned", "tie",
    or "invalid" (the verdict could not be read); the judge's prompt and raw reply are kept.
    """

    __tablename__ = "eval_judgements"
    __table_args__ = (UniqueConstraint("eval_id", "item_index", "position", name="uq_eval_judgement"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    eval_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    item_index: Mapped[int] = mapped_column(Integer)
    position: Mapped[str] = mapped_column(String(16))  # which answer came first ("order" is SQL's)
    state: Mapped[str] = mapped_column(String(16))  # RowState
    prompt: Mapped[str | None] = mapped_column(Text)
    verdict_text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    winner: Mapped[str | None] = mapped_column(String(8))
    model: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    error_kind: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
