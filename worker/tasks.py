"""Celery tasks: thin wrappers around plain functions (generation, dataset, finetune).

Arguments are ids only (no key, no config blob), so broker messages, results and Flower show
nothing secret and stay small.
"""

from __future__ import annotations

import logging

import redis

from worker.app import app
from worker.context import InFlightEntry, get_context
from worker.generation import DB_UNAVAILABLE, record_internal_failure, run_request
from worker.llm import backoff

log = logging.getLogger(__name__)


@app.task(name="gridtune.generate", bind=True, ignore_result=True, max_retries=None)
def generate(self, sweep_id: int, index: int, attempts: int = 0, rate_limited: int = 0) -> None:
    """Request `index` of sweep `sweep_id`: store its row, or come back later."""
    ctx = get_context()
    entry = InFlightEntry(sweep_id, self.request.id)
    try:
        try:
            outcome = run_request(ctx, sweep_id, index, attempts, rate_limited, entry=entry)
        finally:
            entry.close(ctx.redis)
    except (*DB_UNAVAILABLE, redis.ConnectionError, redis.TimeoutError) as exc:
        # The database (or the Redis holding the rate budget) is away: nothing was stored, so run
        # again later (the API call is repeated only if this run made one and could not store it
        # within DB_WRITE_PATIENCE).
        countdown = min(backoff(self.request.retries, ctx.settings.backoff_cap, base=2.0) + 1, ctx.settings.max_countdown)
        log.warning("request %s/%s: database or Redis unavailable (%s); retry in %.0fs", sweep_id, index, exc.__class__.__name__, countdown)
        raise self.retry(countdown=countdown, kwargs={"attempts": attempts, "rate_limited": rate_limited})
    except Exception as exc:  # noqa: BLE001 - a raising header task would stop the chord body
        log.exception("request %s/%s failed unexpectedly", sweep_id, index)
        try:
            record_internal_failure(ctx, sweep_id, index, exc)
        except (LookupError, IndexError):  # the request is no longer in the sweep's grid
            log.error("request %s/%s: not in the sweep's current grid; dropped", sweep_id, index)
        return
    if outcome.retry_in is not None:
        raise self.retry(
            countdown=outcome.retry_in,
            kwargs={"attempts": outcome.attempts, "rate_limited": outcome.rate_limited},
            argsrepr=getattr(self.request, "argsrepr", None),  # keep the label that names the sweep (producer/enqueue.py)
        )


@app.task(name="gridtune.finalize", bind=True, max_retries=None)
def finalize(self, sweep_id: int) -> str:
    """The chord body: build the dataset from the database and hand it to the fine-tune step."""
    from worker.dataset import finalize_sweep

    ctx = get_context()
    try:
        result = finalize_sweep(ctx, sweep_id)
    except DB_UNAVAILABLE:
        raise self.retry(countdown=min(10 * (self.request.retries + 1), ctx.settings.max_countdown))
    if result.dataset_id is not None:
        start_finetune(sweep_id, result.dataset_id)
    return result.state


def start_finetune(sweep_id: int, dataset_id: int) -> None:
    from worker import finetune

    follow(finetune.submit(get_context(), sweep_id, dataset_id))


@app.task(name="gridtune.finetune_submit", ignore_result=True)
def finetune_submit(sweep_id: int, dataset_id: int) -> None:
    """`python -m producer finetune` with workers: the fine-tune step, run where the dataset is."""
    start_finetune(sweep_id, dataset_id)


def follow(step) -> None:
    """Schedule what the fine-tune step asks for next."""
    if step is None or step.job_id is None:
        return
    if step.run_local:
        finetune_local.apply_async((step.job_id,))
    elif step.poll_in is not None:
        finetune_poll.apply_async((step.job_id,), countdown=step.poll_in)


@app.task(name="gridtune.finetune_poll", bind=True, max_retries=None)
def finetune_poll(self, job_id: int) -> None:
    """Follow a remote fine-tune job; reschedules itself until the job ends."""
    from worker import finetune

    follow(finetune.poll(get_context(), job_id))


@app.task(name="gridtune.finetune_local", bind=True, acks_late=True, max_retries=0)
def finetune_local(self, job_id: int) -> None:
    """LoRA training on this machine (routed to the `finetune` queue: run it where the GPU is)."""
    from worker import finetune

    finetune.train_local(get_context(), job_id)


# --- batch mode: thin wrappers around worker/batch.py ----------------------------------------------
@app.task(name="gridtune.batch_submit", bind=True, max_retries=None, ignore_result=True)
def batch_submit(self, batch_id: int) -> None:
    """Upload and create one batch of a batch-mode sweep, then follow it."""
    from worker.batch import submit

    _batch_step(self, batch_id, submit)


@app.task(name="gridtune.batch_poll", bind=True, max_retries=None, ignore_result=True)
def batch_poll(self, batch_id: int) -> None:
    """Follow one batch; at its end store its rows (reschedules itself until then)."""
    from worker.batch import poll

    _batch_step(self, batch_id, poll)


@app.task(name="gridtune.batch_cancel", bind=True, max_retries=None, ignore_result=True)
def batch_cancel(self, batch_id: int) -> None:
    """`python -m producer cancel`: ask the provider to cancel one batch."""
    from worker.batch import cancel

    _batch_step(self, batch_id, cancel)


def _batch_step(task, batch_id: int, step_function) -> None:
    import openai

    from gridtune.errors import UserError
    from worker import batch
    from worker.llm import classify

    ctx = get_context()
    try:
        step = step_function(ctx, batch_id)
    except (*DB_UNAVAILABLE, redis.ConnectionError, redis.TimeoutError, openai.OpenAIError, UserError) as exc:
        failure = classify(exc) if isinstance(exc, (openai.OpenAIError, UserError)) else None
        if failure is not None and not failure.retryable:  # 4xx, quota, auth, no key: the requests fail
            step = batch.give_up(ctx, batch_id, exc)
        else:
            # Transient: the database, Redis or the API is away for now. Every step is idempotent.
            wait = failure.retry_after if failure and failure.retry_after else backoff(
                task.request.retries, ctx.settings.backoff_cap, base=2.0) + 1
            countdown = min(wait, ctx.settings.max_countdown)
            log.warning("batch %s: %s; retry in %.0fs", batch_id, exc.__class__.__name__, countdown)
            raise task.retry(countdown=countdown)
    follow_batch(batch_id, step)


def follow_batch(batch_id: int, step) -> None:
    """Schedule what a batch step asks for next."""
    for new_id in step.new_batches:
        batch_submit.apply_async((new_id,))
    if step.poll_in is not None:
        batch_poll.apply_async((batch_id,), countdown=min(step.poll_in, get_context().settings.max_countdown))
    if step.finalize:
        finalize.apply_async((_sweep_of(batch_id),))


def _sweep_of(batch_id: int) -> int:
    from models import store

    return store.get_batch(get_context().engine, batch_id).sweep_id
