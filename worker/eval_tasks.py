"""Celery tasks of `python -m producer eval` (thin wrappers around worker/evaluation.py).

The chain is the sweep's: a chord of one task per answer whose body (`eval_judge`) sends a chord
of one task per verdict whose body is the eval finalizer. Arguments are ids only.
"""

from __future__ import annotations

import logging

import redis
from celery import chord, group

from worker.app import app
from worker.context import get_context
from worker.generation import DB_UNAVAILABLE
from worker.llm import backoff

log = logging.getLogger(__name__)


def _run(task, step, eval_id: int, index: int, on_bug) -> None:
    ctx = get_context()
    try:
        retry_in = step(ctx, eval_id, index)
    except (*DB_UNAVAILABLE, redis.ConnectionError, redis.TimeoutError) as exc:
        countdown = min(backoff(task.request.retries, ctx.settings.backoff_cap, base=2.0) + 1,
                        ctx.settings.max_countdown)
        log.warning("eval %s/%s: database or Redis unavailable (%s); retry in %.0fs", eval_id, index,
                    exc.__class__.__name__, countdown)
        raise task.retry(countdown=countdown)
    except Exception as exc:  # noqa: BLE001 - a raising header task would stop the chord body
        log.exception("eval %s/%s failed unexpectedly", eval_id, index)
        on_bug(ctx, eval_id, index, exc)
        return
    if retry_in is not None:
        raise task.retry(countdown=retry_in)


def _failed_row(kind: str):
    def store_failure(ctx, eval_id: int, index: int, exc: BaseException) -> None:
        from models import RowState
        from models import eval_store
        from worker.evaluation import POSITIONS, SIDES
        from worker.llm import redact

        item, which = divmod(index, 2)
        values = {"eval_id": eval_id, "item_index": item, "state": RowState.FAILED, "error_kind": "internal",
                  "error": redact(f"{exc.__class__.__name__}: {exc}", ctx.settings)[:2000]}
        if kind == "answer":
            eval_store.insert_answer(ctx.engine, {**values, "side": SIDES[which]})
        else:
            eval_store.insert_judgement(ctx.engine, {**values, "position": POSITIONS[which]})
    return store_failure


@app.task(name="gridtune.eval_answer", bind=True, max_retries=None)
def eval_answer(self, eval_id: int, index: int) -> None:
    """Answer `index` (item * 2 + side) of eval `eval_id`: store its row, or come back later."""
    from worker.evaluation import run_answer

    _run(self, run_answer, eval_id, index, _failed_row("answer"))


@app.task(name="gridtune.eval_verdict", bind=True, max_retries=None)
def eval_verdict(self, eval_id: int, index: int) -> None:
    """Verdict `index` (item * 2 + position) of eval `eval_id`: store its row, or come back later."""
    from worker.evaluation import run_judgement

    _run(self, run_judgement, eval_id, index, _failed_row("verdict"))


@app.task(name="gridtune.eval_judge", bind=True, max_retries=None)
def eval_judge(self, eval_id: int) -> None:
    """The answers chord's body: send the judge chord (its body is the eval finalizer)."""
    from worker.evaluation import start_judging

    ctx = get_context()
    try:
        missing = start_judging(ctx, eval_id)
    except DB_UNAVAILABLE:
        raise self.retry(countdown=min(10 * (self.request.retries + 1), ctx.settings.max_countdown))
    if missing is not None:
        send_stage(eval_id, eval_verdict, missing, finalizer(eval_id))


def _finalize(task, eval_id: int) -> str:
    from worker.evaluation import finalize_eval

    ctx = get_context()
    try:
        return finalize_eval(ctx, eval_id)
    except DB_UNAVAILABLE:
        raise task.retry(countdown=min(10 * (task.request.retries + 1), ctx.settings.max_countdown))


@app.task(name="gridtune.eval_finalize", bind=True, max_retries=None)
def eval_finalize(self, eval_id: int) -> str:
    """The judge chord's body: the metrics that need no model, the run marked done (once)."""
    return _finalize(self, eval_id)


@app.task(name="gridtune.eval_finalize_local", bind=True, max_retries=None)
def eval_finalize_local(self, eval_id: int) -> str:
    """The same for a local adapter, on the `finetune` queue: it loads the model to measure the
    validation loss of base and tuned on the held-out references."""
    return _finalize(self, eval_id)


def finalizer(eval_id: int):
    """The finalizer's signature: on the `finetune` queue when the validation loss needs the model."""
    from models import eval_store, store

    ctx = get_context()
    run = eval_store.get_run(ctx.engine, eval_id)
    local = store.get_job(ctx.engine, run.job_id).backend == "local"
    return (eval_finalize_local if local else eval_finalize).si(eval_id)


def send_stage(eval_id: int, task, indices: list[int], body) -> str | None:
    """One task per index as a chord with `body`; the body alone when nothing is missing."""
    if not indices:
        return body.apply_async().id
    return chord(group(task.si(eval_id, index) for index in indices))(body).id
