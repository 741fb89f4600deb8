"""One request of a sweep, start to finish: the plain function behind the `generate` task.

It ends in exactly one of two ways: a row is stored (ok, or failed with a reason) and it returns
`Outcome(retry_in=None)`, or it asks to be run again later (`retry_in` seconds) because waiting
inline would hold a worker slot too long. It never raises for API trouble, so the chord body runs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
from sqlalchemy.exc import OperationalError, InterfaceError

from gridtune.errors import UserError
from gridtune.sweep import Request, SweepConfig, request_at
from models import RowState, SweepState, store
from models.schema import utcnow
from worker import health, llm
from worker.context import InFlightEntry, WorkerContext
from worker.ratelimit.concurrency import is_metered
from worker.ratelimit.roundtrip import RoundTrip
from worker.spend import RequestSpend
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
    """The keyword arguments of chat.completions.create: model, messages, the token limit, the
    sampling parameters the config sets (no others) and `extra_body` when the config has one."""
    model = config.model
    params: dict[str, Any] = {"model": model.name, "messages": messages, model.token_param: model.max_output_tokens}
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", "stop"):
        if (value := getattr(model, name)) is not None:  # only what the config sets
            params[name] = value
    if model.extra_body:
        params["extra_body"] = dict(model.extra_body)  # server-specific fields, merged into the JSON body
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


def _in_flight_cap(ctx: WorkerContext, config: SweepConfig) -> int | None:
    return ctx.settings.max_in_flight or config.model.max_in_flight


def _take_slot(ctx: WorkerContext, key: str, config: SweepConfig):
    """Wait inline for a slot at the endpoint (the shared in-flight limit): `take` returns as soon
    as a release anywhere frees one, so the task keeps its worker slot rather than going back to
    the broker."""
    return ctx.in_flight_limiter.take(key, _in_flight_cap(ctx, config))


def _queue_give_slot_back(ctx: WorkerContext, trip: RoundTrip, lease, config: SweepConfig, latency: float | None,
                          failure: llm.Failure | None, headers) -> None:
    """Free the slot; an answer's latency (seconds) teaches the adaptive limit, an overload sign cuts it."""
    outcome = "ok" if failure is None else "overload" if failure.overload else "other"
    ctx.in_flight_limiter.queue_release(trip, lease, latency=latency if failure is None else None, outcome=outcome,
                                        metered=is_metered(headers), cap=_in_flight_cap(ctx, config))


def record_internal_failure(ctx: WorkerContext, sweep_id: int, index: int, exc: BaseException) -> None:
    """A bug must not lose the row or block the chord: store it as failed with the reason."""
    sweep = store.get_sweep_by_id(ctx.engine, sweep_id)
    request = request_at(store.sweep_config(sweep), index)
    _store(ctx, _row(sweep_id, request, state=RowState.FAILED, error_kind="internal",
                     error=llm.redact(f"{exc.__class__.__name__}: {exc}", ctx.settings)[:2000]))


def send_once(ctx: WorkerContext, client, key: str, config: SweepConfig, params: dict[str, Any], *,
              lease=None, after: Callable[[RoundTrip, dict[str, Any] | None, llm.Failure | None], None] | None = None,
              ) -> tuple[dict[str, Any] | None, llm.Failure | None, float | None]:
    """One chat completion inside the endpoint's shared in-flight slot: (parsed body, None, latency)
    or (None or the body, the classified failure, latency or None). The latency (seconds) is the
    call's alone, from holding the slot to the answer: the wait for the slot is not in it. The
    rate budget `key` learns from the answer's headers; the slot learns its latency. Never raises
    for API trouble: sweeps and evals share it.

    `lease`: a slot the caller already holds (taken with its reservation); else one is waited
    for here. `after(trip, body, failure)` queues the caller's own bookkeeping into the round trip
    that gives the slot back, so an answer costs one Redis round trip after the call.
    """
    slot = lease if lease is not None else _take_slot(ctx, key, config)
    began = time.monotonic()
    body = latency = headers = None
    try:
        raw = llm.post_chat_completion(client, params)
        latency, headers = time.monotonic() - began, raw.headers
        body = json.loads(raw.content)  # not JSON: ValueError, classified as malformed below
        # A 2xx is not always a completion: some gateways answer 200 {"error": {...}}.
        failure = llm.completion_problem(body, raw.headers)
    except Exception as exc:  # noqa: BLE001 - every failure is classified
        response = getattr(exc, "response", None)
        if response is not None:
            headers = response.headers
        failure = llm.classify(exc)
    trip = RoundTrip(ctx.redis)
    if headers is not None:
        ctx.limiter.queue_observe(trip, key, headers)
    _queue_give_slot_back(ctx, trip, slot, config, latency, failure, headers)
    if after is not None:
        after(trip, body, failure)
    _bookkeeping(trip.execute)
    return body, failure, latency


def _give_back_unused(ctx: WorkerContext, lease) -> None:
    """A slot taken with a reservation that was refused (or a capped spend): nothing was sent.
    (A lease without a token holds nothing: `release` then sends nothing.)"""
    if lease is not None:
        ctx.in_flight_limiter.release(lease, outcome="other")


def run_request(ctx: WorkerContext, sweep_id: int, index: int, attempts: int = 0, rate_limited: int = 0,
                entry: InFlightEntry | None = None) -> Outcome:
    """Generate and store request `index` of sweep `sweep_id` (see the module docstring).

    `entry`: the task's place in the sweep's in-flight set, added with the first reservation
    and removed with a success's bookkeeping (the caller closes it in any case)."""
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
    key = ctx.rate_budget(config.model.name, config)
    prompt_tokens = count_messages(messages, encoding_name(config.model.name))
    reserved = prompt_tokens + config.model.max_output_tokens
    params = request_params(config, messages)
    spend = RequestSpend.for_request(ctx.spend, sweep, config, prompt_tokens)  # money: the spend cap

    answer: Answer | None = None  # read once, for the token settle and for the row

    def after_call(trip: RoundTrip, body: dict[str, Any] | None, failure: llm.Failure | None) -> None:
        """The answer's bookkeeping, in the round trip that frees the slot."""
        nonlocal answer
        if failure is not None:
            ctx.limiter.queue_settle(trip, key, reserved, 0)  # a refused or failed call used no tokens
            return
        answer = read_completion(body)
        if answer.total_tokens is not None:
            ctx.limiter.queue_settle(trip, key, reserved, answer.total_tokens)
        health.queue_succeeded(trip, sweep)  # a success ends any failure streak
        if entry is not None:
            entry.queue_remove(trip)

    while True:
        # One round trip: the task joins the in-flight set, reserves its rate and takes a slot.
        trip = RoundTrip(ctx.redis)
        if entry is not None:
            entry.queue_add(trip)
        granted = ctx.limiter.queue_reserve(trip, key, reserved)
        slot = ctx.in_flight_limiter.queue_acquire(trip, key, _in_flight_cap(ctx, config))
        trip.execute()
        lease = slot.value[0]
        wait = granted.value
        if wait > 0:
            _give_back_unused(ctx, lease)
            if wait > settings.max_inline_wait:
                return Outcome(retry_in=min(wait, settings.max_countdown), attempts=attempts, rate_limited=rate_limited)
            time.sleep(wait)
            continue
        if (cap_reached := spend.cap_reached()) is not None:
            ctx.limiter.settle(key, reserved, 0)
            _give_back_unused(ctx, lease)
            if store.stop_sweep(engine, sweep_id, cap_reached):
                log.warning("sweep %s stopped: %s", sweep.name, cap_reached)
            return fail("spend_cap", f"not sent: {cap_reached}")

        attempts += 1
        body, failure, latency = send_once(ctx, client, key, config, params, lease=lease, after=after_call)
        if failure is not None:
            spend.release(failure.kind)
            if failure.kind == "rate_limited":
                rate_limited += 1
                wait = failure.retry_after if failure.retry_after else llm.backoff(rate_limited, settings.backoff_cap)
                ctx.limiter.cool_down(key, wait)  # the whole cluster pauses, not just this task
                give_up = rate_limited >= settings.max_attempts * 4
                endpoint_dead = None
            else:
                wait = failure.retry_after if failure.retry_after else llm.backoff(attempts, settings.backoff_cap)
                give_up = not failure.retryable or attempts - rate_limited >= settings.max_attempts
                endpoint_dead = health.failed(ctx, sweep, failure)
            if endpoint_dead:
                # Every recent request failed the same way: stop the sweep now, as for an auth failure.
                if store.stop_sweep(engine, sweep_id, llm.redact(endpoint_dead, settings)):
                    log.error("sweep %s stopped: %s", sweep.name, llm.redact(endpoint_dead, settings))
                return fail(failure.kind, failure.message + f" (attempt {attempts}; the sweep was stopped)")
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

        latency_ms = latency * 1000  # the answered call's, not the wait for an in-flight slot
        content, refusal = answer.content, answer.refusal
        common = dict(
            model=answer.model, finish_reason=answer.finish_reason, refusal=refusal,
            prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
            latency_ms=round(latency_ms, 1), attempts=attempts, rate_limited=rate_limited, started_at=started,
            # The answer carries prompt_tokens / completion_tokens (None when the provider sent no usage).
            cost_usd=spend.settle(answer if answer.prompt_tokens is not None and answer.completion_tokens is not None
                                  else None),
        )
        if not content and refusal:
            values = _row(sweep_id, request, state=RowState.FAILED, error_kind="refused",
                          error=f"the model refused: {refusal}", response_text=None, **common)
        elif not content:
            values = _row(sweep_id, request, state=RowState.FAILED, error_kind="empty",
                          error="the model returned no text", response_text=None, **common)
        else:
            values = _row(sweep_id, request, state=RowState.OK, response_text=content, **common)
        stored = _store(ctx, values)
        return Outcome(attempts=attempts, rate_limited=rate_limited, stored=stored)


@dataclass(frozen=True)
class Answer:
    """What a completion body says, every field of a usable type (None when absent or odd)."""

    content: str
    refusal: str | None
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


def read_completion(body: dict[str, Any]) -> Answer:
    """The first choice and the usage of a chat.completion body (checked by llm.completion_problem).

    Never raises, whatever the types inside: a paid response always becomes a row with its usage.
    """
    choice = body["choices"][0] if isinstance(body["choices"][0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Answer(
        content=_text(message.get("content")),
        refusal=_text(message.get("refusal")) or None,
        finish_reason=None if choice.get("finish_reason") is None else str(choice["finish_reason"]),
        model=None if body.get("model") is None else str(body["model"]),
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=total,
    )


def _count(value: Any) -> int | None:
    """A token count as an int (servers send 12, 12.0 or "12"); None when it is not one."""
    try:
        number = int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return number if 0 <= number < 2**31 else None


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts (some servers)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text") or "") if isinstance(part, dict) else str(part) for part in content)
    return ""
