"""Fine-tuning through OpenAI's API (or any provider that serves the same API at OPENAI_BASE_URL).

Upload the files, create the job, then poll it: status changes and the provider's events become
FinetuneEvent rows. Transient API errors come back as a later poll (which also resubmits a job
the provider never accepted); permanent ones fail the job. Nothing here raises for an API error.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import openai

from gridtune.errors import UserError
from gridtune.files import read_text
from gridtune.sweep import FinetuneSettings
from models import JobStatus, store
from models.schema import FinetuneJob
from worker.finetune import Step, poll_interval
from worker.llm import backoff, classify, redact

log = logging.getLogger(__name__)

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
MAX_SUFFIX = 64
EVENTS_PAGE = 100
UNAVAILABLE = (
    "fine-tuning is not available to this organization: OpenAI is winding down self-serve fine-tuning "
    "(HTTP 403 training_not_available: {reason}); the dataset is ready at {train_path}: "
    'use backend = "local" or another provider'
)


def job_suffix(settings: FinetuneSettings, sweep_name: str) -> str | None:
    """The config's suffix, else the sweep name reduced to what model names allow (<= 64 chars)."""
    if settings.suffix:
        return settings.suffix
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", sweep_name).strip("-_")
    return cleaned[:MAX_SUFFIX].rstrip("-_") or None


def job_request(settings: FinetuneSettings, suffix: str | None, training_file: str,
                validation_file: str | None) -> dict[str, Any]:
    """The arguments of fine_tuning.jobs.create; "auto" hyperparameters are left to the provider."""
    hyperparameters = {name: getattr(settings, name) for name in HYPERPARAMETERS if getattr(settings, name) != "auto"}
    request: dict[str, Any] = {
        "model": settings.base_model,
        "training_file": training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }
    if validation_file:
        request["validation_file"] = validation_file
    if suffix:
        request["suffix"] = suffix
    if settings.seed is not None:
        request["seed"] = settings.seed
    return request


def start(ctx, job: FinetuneJob) -> Step:
    """Upload the dataset (unless an earlier attempt did) and create the provider's job."""
    engine = ctx.engine
    sweep = store.get_sweep_by_id(engine, job.sweep_id)
    settings = store.sweep_config(sweep).finetune
    dataset = store.get_dataset(engine, job.dataset_id)
    try:
        client = ctx.client
    except UserError as exc:
        return _fail(ctx, job, "no_api_key", str(exc))
    try:
        if job.training_file_id and (adopted := _created_earlier(client, job.training_file_id)):
            # An earlier create reached the provider but its answer was lost: follow that job.
            return _accepted(ctx, job, adopted, "found the job an earlier attempt created")
        training_file = job.training_file_id or _upload(ctx, job, dataset.train_path, "training_file_id")
        validation_file = job.validation_file_id
        if dataset.validation_path and not validation_file:
            validation_file = _upload(ctx, job, dataset.validation_path, "validation_file_id")
        request = job_request(settings, job_suffix(settings, sweep.name), training_file, validation_file)
        remote = client.fine_tuning.jobs.create(**request)
    except openai.OpenAIError as exc:
        return api_error(ctx, job, exc, "submitting the fine-tune job")
    except UserError as exc:
        return _fail(ctx, job, "dataset_unreadable", str(exc))
    return _accepted(ctx, job, remote, f"submitted to the provider as {remote.id}")


def poll(ctx, job: FinetuneJob) -> Step:
    if job.provider_job_id is None:
        return start(ctx, job)
    try:
        client = ctx.client
    except UserError as exc:
        return _fail(ctx, job, "no_api_key", str(exc))
    try:
        remote = client.fine_tuning.jobs.retrieve(job.provider_job_id)
        fresh = new_provider_events(ctx, client, job)
    except openai.OpenAIError as exc:
        return api_error(ctx, job, exc, "polling the fine-tune job")
    for event in fresh:
        store.add_event(
            ctx.engine, job.id, redact(event.message, ctx.settings),
            level=event.level,
            data={"type": event.type, **(event.data or {})},
            provider_event_id=event.id,
            created_at=datetime.fromtimestamp(event.created_at, timezone.utc),
        )
    return _record_remote(ctx, job, remote)


def _upload(ctx, job: FinetuneJob, path: str, column: str) -> str:
    # Sent as plain UTF-8 whatever mark or UTF an editor re-saved it with (read like every user file).
    content = read_text(path, "JSONL training file").encode("utf-8")
    uploaded = ctx.client.files.create(file=(Path(path).name, content), purpose="fine-tune")
    store.update_job(ctx.engine, job.id, **{column: uploaded.id})
    store.add_event(ctx.engine, job.id, f"uploaded {Path(path).name} as {uploaded.id}",
                    data={"type": "upload", "file_id": uploaded.id})
    return uploaded.id


def _created_earlier(client: openai.OpenAI, training_file_id: str):
    """The provider's job on this training file, if one exists (the file was uploaded for our job only)."""
    try:
        listed = client.fine_tuning.jobs.list(limit=EVENTS_PAGE).data
    except openai.NotFoundError:
        return None  # a provider that cannot list jobs: nothing to adopt
    return next((remote for remote in listed if remote.training_file == training_file_id), None)


def _accepted(ctx, job: FinetuneJob, remote, detail: str) -> Step:
    store.set_status(ctx.engine, job.id, remote.status, detail, provider_job_id=remote.id)
    log.info("fine-tune job %s: %s", job.id, detail)
    return Step(job.id, poll_in=poll_interval(ctx.settings))


def new_provider_events(ctx, client: openai.OpenAI, job: FinetuneJob) -> list:
    """The provider's events not stored yet, oldest first (the API pages newest first)."""
    known = store.provider_event_ids(ctx.engine, job.id)
    fresh: list = []
    after: dict[str, str] = {}
    while True:
        page = client.fine_tuning.jobs.list_events(job.provider_job_id, limit=EVENTS_PAGE, **after)
        for event in page.data:
            if event.id in known:
                return fresh[::-1]
            fresh.append(event)
        if not page.has_more or not page.data:
            return fresh[::-1]
        after = {"after": page.data[-1].id}


def _record_remote(ctx, job: FinetuneJob, remote) -> Step:
    values: dict[str, Any] = {}
    if remote.trained_tokens is not None:
        values["trained_tokens"] = remote.trained_tokens
    if remote.fine_tuned_model:
        values["fine_tuned_model"] = remote.fine_tuned_model
    if remote.status == JobStatus.FAILED:
        error = remote.error
        values["error_code"] = (error.code if error else None) or "failed"
        values["error_message"] = redact(error.message if error and error.message else "the provider gave no reason",
                                         ctx.settings)
    store.set_status(ctx.engine, job.id, remote.status, **values)
    if remote.status in JobStatus.FINAL:
        log.info("fine-tune job %s ended %s %s", job.id, remote.status, remote.fine_tuned_model or "")
        return Step(job.id)
    return Step(job.id, poll_in=poll_interval(ctx.settings))


def api_error(ctx, job: FinetuneJob, exc: openai.OpenAIError, doing: str) -> Step:
    """Turn an API error into the job's state and the next step; never raises."""
    settings = ctx.settings
    if isinstance(exc, openai.PermissionDeniedError) and exc.code == "training_not_available":
        train_path = store.get_dataset(ctx.engine, job.dataset_id).train_path
        message = UNAVAILABLE.format(reason=redact(exc.message, settings), train_path=train_path)
        store.set_status(ctx.engine, job.id, JobStatus.UNAVAILABLE, error_code=exc.code, error_message=message)
        log.warning("fine-tune job %s: %s", job.id, message)
        return Step(job.id)
    failure = classify(exc)
    reason = redact(f"{doing}: {failure.message}", settings)
    if not failure.retryable:
        return _fail(ctx, job, getattr(exc, "code", None) or failure.kind, reason)
    retry = _retries_so_far(ctx, job) + 1
    if job.provider_job_id is None and retry >= settings.max_attempts:
        return _fail(ctx, job, failure.kind, f"{reason} (gave up after {retry} attempts; "
                                             "`python -m producer finetune SWEEP` tries again)")
    # Polling a job the provider accepted goes on as long as it takes; the job runs there anyway.
    interval = poll_interval(settings)
    wait = min(settings.max_countdown,
               max(failure.retry_after or 0.0, interval + backoff(retry - 1, settings.max_countdown, base=interval)))
    store.add_event(ctx.engine, job.id, f"{reason}; retry {retry} in {wait:.1f}s", level="warning",
                    data={"type": "retry", "retry": retry, "error": failure.kind})
    log.warning("fine-tune job %s: %s; retry %d in %.1fs", job.id, reason, retry, wait)
    return Step(job.id, poll_in=wait)


def _retries_so_far(ctx, job: FinetuneJob) -> int:
    """Consecutive transient failures: the last event counts them while nothing else happened."""
    last = store.last_event(ctx.engine, job.id)
    if last is None or not last.data or last.data.get("type") != "retry":
        return 0
    return int(last.data["retry"])


def _fail(ctx, job: FinetuneJob, code: str, message: str) -> Step:
    store.set_status(ctx.engine, job.id, JobStatus.FAILED, error_code=code, error_message=message)
    log.error("fine-tune job %s failed: %s", job.id, message)
    return Step(job.id)
