"""`finetune`, `jobs` and `ask`: run the fine-tune step by hand, list the jobs, sample a tuned model."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from gridtune.errors import UserError
from gridtune.settings import get_settings
from models import FinetuneJob, JobStatus, get_engine, store

SUBMIT_TASK = "gridtune.finetune_submit"
WAIT_INTERVAL_SECONDS = 1.0
JOBS_ROW = "{:>4}  {:20} {:8} {:16} {:>12} {:>9}  {}"


def add_commands(commands) -> None:
    finetune = commands.add_parser("finetune", help="(re-)run the fine-tune step on a sweep's latest dataset")
    finetune.add_argument("name", help="the sweep")
    finetune.add_argument("--wait", action="store_true",
                          help="with workers: follow the job until it ends (embedded mode always does)")
    finetune.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds")
    finetune.set_defaults(handler=cmd_finetune)

    jobs = commands.add_parser("jobs", help="fine-tune jobs: backend, status, model or adapter, estimate, error")
    jobs.add_argument("--json", action="store_true", help="one JSON document for scripts")
    jobs.set_defaults(handler=cmd_jobs)

    ask = commands.add_parser("ask", help='sample a sweep\'s tuned model: ask SWEEP "18, man, can eat a lot"')
    ask.add_argument("name", help="the sweep")
    ask.add_argument("text", help="the short input, as in the dataset's user turns")
    ask.set_defaults(handler=cmd_ask)


# --- finetune -------------------------------------------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> int:
    settings = get_settings()
    engine = get_engine(settings.database_url)
    sweep = store.get_sweep(engine, args.name)
    dataset = store.latest_dataset(engine, sweep.id)
    if dataset is None:
        raise UserError(f"sweep {sweep.name} has no dataset yet (state {sweep.state})")
    printer = EventPrinter(engine)
    if settings.embedded:
        finetune_settings = store.sweep_config(sweep).finetune
        backend = finetune_settings.backend
        if backend == "local":
            # Training runs in this process: a missing extra or model is the user's to fix (exit 2).
            from worker.finetune.local_backend import check_ready

            check_ready(finetune_settings.base_model, settings.model_cache_dir)
        with worker_context(needs_api=backend == "openai") as ctx:
            job = run_in_process(ctx, sweep.id, dataset.id, printer, args.timeout)
    else:
        job = send_to_workers(engine, sweep, dataset.id, printer, args.wait, args.timeout)
        if job is None:
            return 0
    from worker.finetune import REFUSED_LOCALLY

    if job.error_code == REFUSED_LOCALLY:  # the backend's rules, checked before any upload
        raise UserError(f"fine-tune of {sweep.name} {job.error_message}")
    print(describe_outcome(job, sweep.name))
    return 0 if job.status in (JobStatus.SUCCEEDED, JobStatus.SKIPPED) else 1


def run_in_process(ctx, sweep_id: int, dataset_id: int, printer: EventPrinter, timeout: float | None) -> FinetuneJob:
    """Embedded mode: submit, then poll or train here until the job ends (or `timeout` passes)."""
    from worker import finetune

    deadline = None if timeout is None else time.monotonic() + timeout
    step = finetune.submit(ctx, sweep_id, dataset_id)
    while True:
        printer.show(step.job_id)
        if step.run_local:
            finetune.train_local(ctx, step.job_id, on_event=printer.on_event(step.job_id))
            printer.show(step.job_id)
            return store.get_job(ctx.engine, step.job_id)
        if step.poll_in is None or (deadline is not None and time.monotonic() + step.poll_in > deadline):
            return store.get_job(ctx.engine, step.job_id)
        time.sleep(step.poll_in)
        step = finetune.poll(ctx, step.job_id)


def send_to_workers(engine, sweep, dataset_id: int, printer: EventPrinter, wait: bool,
                    timeout: float | None) -> FinetuneJob | None:
    """Distributed mode: a worker runs the step (it has the dataset files); optionally follow it here."""
    from kombu.exceptions import OperationalError as KombuOperationalError

    from worker.app import app

    before = store.latest_job(engine, sweep.id)
    try:
        app.send_task(SUBMIT_TASK, args=(sweep.id, dataset_id))
    except (KombuOperationalError, OSError) as exc:
        raise UserError(f"cannot reach the broker: {exc}") from None
    print(f"sent the fine-tune step of {sweep.name} to the workers", file=sys.stderr, flush=True)
    if not wait:
        print("follow it with `python -m producer jobs`", file=sys.stderr)
        return None
    # The worker continues an unfinished job, else it creates a new one.
    continuing = before is not None and before.status not in JobStatus.FINAL
    deadline = None if timeout is None else time.monotonic() + timeout
    job = None
    while deadline is None or time.monotonic() < deadline:
        job = store.latest_job(engine, sweep.id)
        if job is not None and (continuing or before is None or job.id != before.id):
            printer.show(job.id)
            if job.status in JobStatus.FINAL:
                return job
        time.sleep(WAIT_INTERVAL_SECONDS)
    if job is None or (before is not None and job.id == before.id and not continuing):
        raise UserError(f"no worker took the fine-tune step of {sweep.name} within {timeout}s: "
                        f"are workers running (and do they know the task {SUBMIT_TASK})?")
    return job


@contextmanager
def worker_context(needs_api: bool, local_model: str | None = None) -> Iterator[object]:
    """A WorkerContext for this process; without a key (or for a `local_model`, e.g. an adapter
    folder), on gridtune's local API server, as embedded `sweep` does."""
    from worker.context import WorkerContext
    from worker.embedded import local_api_when_keyless

    if not needs_api:
        yield WorkerContext(get_settings())
        return
    with local_api_when_keyless("fine-tuning and asking", local_model):
        yield WorkerContext(get_settings())


class EventPrinter:
    """Prints a job's new events as progress lines on stderr."""

    def __init__(self, engine):
        self.engine = engine
        self.last_seen: dict[int, int] = {}

    def show(self, job_id: int | None) -> None:
        if job_id is None:
            return
        for event in store.events_after(self.engine, job_id, self.last_seen.get(job_id, 0)):
            marker = "!" if event.level in ("warning", "error", "warn") else " "
            print(f" {marker} job {job_id}: {event.message}", file=sys.stderr, flush=True)
            self.last_seen[job_id] = event.id

    def on_event(self, job_id: int):
        """A callback for local training: show what it just stored."""
        return lambda _message: self.show(job_id)


def describe_losses(job: FinetuneJob) -> str | None:
    """ "train loss 0.27, validation loss 4.36 -> 0.35" from what the job stored; None if nothing."""
    parts = []
    if job.train_loss is not None:
        parts.append(f"train loss {job.train_loss:.4f}")
    if job.validation_loss_before is not None and job.validation_loss_after is not None:
        parts.append(f"validation loss {job.validation_loss_before:.4f} -> {job.validation_loss_after:.4f}")
    return ", ".join(parts) or None


def describe_outcome(job: FinetuneJob, sweep_name: str) -> str:
    if job.status == JobStatus.SUCCEEDED:
        what = "adapter" if job.backend == "local" else "model"
        losses = describe_losses(job)
        return (f"fine-tune job {job.id} succeeded: {what} {job.fine_tuned_model}"
                + (f" ({losses})" if losses else "") + "\n"
                f'try it: python -m producer ask {shlex.quote(sweep_name)} "..."')
    if job.status == JobStatus.SKIPPED:
        return f'fine-tune job {job.id} skipped (backend = "none"): the dataset is the result'
    if job.status in JobStatus.FINAL:
        return f"fine-tune job {job.id} {job.status}: {job.error_message or 'no reason given'}"
    return f"fine-tune job {job.id} is still {job.status}; follow it with `python -m producer jobs`"


# --- jobs -----------------------------------------------------------------------------------
def job_record(job: FinetuneJob, sweep_name: str) -> dict:
    return {
        "id": job.id,
        "sweep": sweep_name,
        "backend": job.backend,
        "base_model": job.base_model,
        "status": job.status,
        "provider_job_id": job.provider_job_id,
        "fine_tuned_model": job.fine_tuned_model,
        "trained_tokens": job.trained_tokens,
        "train_loss": job.train_loss,
        "validation_loss_before": job.validation_loss_before,
        "validation_loss_after": job.validation_loss_after,
        "estimated_tokens": job.estimated_tokens,
        "estimated_cost_usd": job.estimated_cost_usd,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def cmd_jobs(args: argparse.Namespace) -> int:
    engine = get_engine(get_settings().database_url)
    jobs = store.list_jobs(engine)
    if args.json:
        print(json.dumps([job_record(job, name) for job, name in jobs], indent=2))
        return 0
    if not jobs:
        from models.db import describe_database

        print(f"no fine-tune jobs yet in {describe_database(engine)}: they start when a sweep's dataset is "
              "ready (or with `python -m producer finetune SWEEP`)", file=sys.stderr)
        return 0
    print(JOBS_ROW.format("id", "sweep", "backend", "status", "est. tokens", "est. cost", "job / model or adapter"))
    for job, name in jobs:
        tokens = f"{job.estimated_tokens:,}" if job.estimated_tokens is not None else "-"
        cost = f"${job.estimated_cost_usd:,.2f}" if job.estimated_cost_usd is not None else "-"
        where = " ".join(filter(None, [job.provider_job_id, job.fine_tuned_model])) or "-"
        print(JOBS_ROW.format(job.id, name, job.backend, job.status, tokens, cost, where))
        if losses := describe_losses(job):
            print(f"{'':6}{losses}")
        if job.error_message:
            print(f"{'':6}error: {job.error_message}")
    return 0


# --- ask ------------------------------------------------------------------------------------
def cmd_ask(args: argparse.Namespace) -> int:
    from worker.finetune.ask import finished_job, sample

    settings = get_settings()
    engine = get_engine(settings.database_url)
    sweep = store.get_sweep(engine, args.name)
    job = finished_job(engine, sweep)
    local_model = job.fine_tuned_model if job.backend == "local" else None
    if local_model:
        from gridtune.localmodel import check_adapter

        check_adapter(local_model)
    with worker_context(needs_api=True, local_model=local_model) as ctx:
        print(sample(ctx, sweep, job, args.text))
    return 0
