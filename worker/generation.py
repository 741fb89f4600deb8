"""One request of a sweep, start to finish: the plain function behind the `generate` task.

It ends in exactly one of two ways: a row is stored (ok, or failed with a reason) and it returns
`Outcome(retry_in=None)`, or it asks to be run again later (`retry_in` seconds) because waiting
inline would hold a worker slot too long. It never raises for API trouble, so the chord body runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy.exc import OperationalError, InterfaceError

from gridtune.errors import UserError
from gridtune.sweep import Request, SweepConfig, request_at
from models import RowState, SweepState, store
from models.schema import utcnow
from worker import llm
from worker.context import WorkerContext
from worker.tokens import count_messages, encoding_name

log = logging.getLogger(__name__)

# Errors that mean "the database is away for now": wait and try again, never lose the row.
DB_UNAVAILABLE = (OperationalError, InterfaceError)
DB_WRITE_PATIENCE = 30.0  # seconds a finished response waits for the database before giving up


@dataclass(frozen=True)
class Outcome:
    retry_in: float | None = None
    attempts: int = 0
    rate_limited: int = 0
    stored: bool = False


def build_messages(config: SweepConfig, prompt: str) -> list[dict[str, str]]:
    messages = []
    if config.templates.system:
        messages.append({"role": "system", "content": config.templates.system})
    messages.append({"role": "user", "content": prompt})
    return messages


def request_params(config: SweepConfig, messages: list[dict[str, str]]) -> dict[str, Any]:
    model = config.model
    params: dict[str, Any] = {"model": model.name, "messages": messages, model.token_param: model.max_output_tokens}
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "stop"):
        if (value := getattr(model, name)) is not None:
            params[name] = value
    return params


def _row(sweep_id: int, request: Request, **values: Any) -> dict[str, Any]:
    return {
        "sweep_id": sweep_id,
        "request_index": request.index,
        "repeat": request.repeat,
        "params": request.params,
        "prompt": request.prompt,
        "input_text": request.input_text,
        "finished_at": utcnow(),
        **values,
    }


def _store(ctx: WorkerContext, values: dict[str, Any]) -> bool:
    """Insert-or-ignore, waiting out a short database outage rather than dropping a paid response."""
    deadline = time.monotonic() + DB_WRITE_PATIENCE
    delay = 0.5
    while True:
        try:
            return store.insert_generation(ctx.engine, values)
        except DB_UNAVAILABLE:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable; retrying the write in %.1fs", delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _bookkeeping(call, *args) -> None:
    """Budget bookkeeping once the API has answered (learning headers, settling tokens): if Redis
    is away it is skipped, so the answer is still stored instead of failing as "unexpected" or
    being paid for again. (Before the call, a Redis error makes the task retry: worker/tasks.py.)"""
    try:
        call(*args)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("rate budget bookkeeping skipped: Redis unavailable (%s)", exc.__class__.__name__)


def record_internal_failure(ctx: WorkerContext, sweep_id: int, index: int, exc: BaseException) -> None:
    """A bug must not lose the row or block the chord: store it as failed with the reason."""
    sweep = store.get_sweep_by_id(ctx.engine, sweep_id)
    request = request_at(store.sweep_config(sweep), index)
    _store(ctx, _row(sweep_id, request, state=RowState.FAILED, error_kind="internal",
                     error=llm.redact(f"{exc.__class__.__name__}: {exc}", ctx.settings)[:2000]))


def run_request(ctx: WorkerContext, sweep_id: int, index: int, attempts: int = 0, rate_limited: int = 0) -> Outcome:
    """Generate and store request `index` of sweep `sweep_id` (see the module docstring)."""
    engine, settings = ctx.engine, ctx.settings
    sweep, stored = store.sweep_and_row(engine, sweep_id, index)
    if stored:
        return Outcome(attempts=attempts, rate_limited=rate_limited)  # redelivered: never call twice
    config = store.sweep_config(sweep)
    request = request_at(config, index)
    started = utcnow()

    def fail(kind: str, reason: str) -> Outcome:
        stored = _store(ctx, _row(sweep_id, request, state=RowState.FAILED, error_kind=kind,
                                  error=llm.redact(reason, settings)[:2000], attempts=attempts,
                                  rate_limited=rate_limited, started_at=started))
        return Outcome(attempts=attempts, rate_limited=rate_limited, stored=stored)

    if sweep.state == SweepState.STOPPED:
        return fail("stopped", f"not sent: the sweep was stopped ({sweep.stop_reason})")

    try:
        client = ctx.client
    except UserError as exc:  # no API key in this worker's environment
        store.stop_sweep(engine, sweep_id, str(exc))
        return fail("auth", str(exc))
    messages = build_messages(config, request.prompt)
    key = llm.budget_key(config.model.name, settings)
    ctx.configure_budget(key, config)
    reserved = count_messages(messages, encoding_name(config.model.name)) + config.model.max_output_tokens
    params = request_params(config, messages)

    while True:
        wait = ctx.limiter.reserve(key, reserved)
        if wait > 0:
            if wait > settings.max_inline_wait:
                return Outcome(retry_in=min(wait, settings.max_countdown), attempts=attempts, rate_limited=rate_limited)
            time.sleep(wait)
            continue

        attempts += 1
        began = time.monotonic()
        try:
            raw = client.chat.completions.with_raw_response.create(**params)
            _bookkeeping(ctx.limiter.observe, key, raw.headers)
            completion = raw.parse()
        except Exception as exc:  # noqa: BLE001 - every failure is classified below
            response = getattr(exc, "response", None)
            if response is not None:
                ctx.limiter.observe(key, response.headers)
            ctx.limiter.settle(key, reserved, 0)  # a refused or failed call used no tokens
            failure = llm.classify(exc)
            if failure.kind == "rate_limited":
                rate_limited += 1
                wait = failure.retry_after if failure.retry_after else llm.backoff(rate_limited, settings.backoff_cap)
                ctx.limiter.cool_down(key, wait)  # the whole cluster pauses, not just this task
                give_up = rate_limited >= settings.max_attempts * 4
            else:
                wait = failure.retry_after if failure.retry_after else llm.backoff(attempts, settings.backoff_cap)
                give_up = not failure.retryable or attempts - rate_limited >= settings.max_attempts
            if give_up:
                if failure.stops_sweep and store.stop_sweep(engine, sweep_id, llm.redact(failure.message, settings)):
                    log.error("sweep %s stopped: %s", sweep.name, llm.redact(failure.message, settings))
                suffix = "" if not failure.retryable else f" (gave up after {attempts} attempts)"
                return fail(failure.kind, failure.message + suffix)
            log.info("request %s/%s: %s; retrying in %.1fs", sweep_id, index, failure.kind, wait)
            wait = min(wait, settings.max_countdown)
            if wait > settings.max_inline_wait:
                return Outcome(retry_in=wait, attempts=attempts, rate_limited=rate_limited)
            time.sleep(wait)
            continue

        latency_ms = (time.monotonic() - began) * 1000
        usage = completion.usage
        if usage is not None:
            _bookkeeping(ctx.limiter.settle, key, reserved, usage.total_tokens)
        choice = completion.choices[0] if completion.choices else None
        content = choice.message.content if choice is not None else None
        common = dict(
            model=completion.model, finish_reason=choice.finish_reason if choice else None,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            latency_ms=round(latency_ms, 1), attempts=attempts, rate_limited=rate_limited, started_at=started,
        )
        if not content:
            values = _row(sweep_id, request, state=RowState.FAILED, error_kind="empty",
                          error="the model returned no text", response_text=content, **common)
        else:
            values = _row(sweep_id, request, state=RowState.OK, response_text=content, **common)
        stored = _store(ctx, values)
        return Outcome(attempts=attempts, rate_limited=rate_limited, stored=stored)
