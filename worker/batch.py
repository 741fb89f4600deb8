"""Batch mode: a sweep's requests through the provider's Batch API (half price, results within 24 h).

The producer cuts the requests without an ok row (and not in a batch already in flight) into
batches of at most `batch_max_requests` requests and `batch_max_bytes` bytes (`plan_batches`) and
stores them as pending rows of the `batches` table. Then, per batch, plain functions that the thin
tasks in `worker/tasks.py` call:

- `submit`: build the input file (one line per request, `custom_id` = "gridtune-<sweep>-<index>",
  `body` = exactly what the online mode sends), upload it (`purpose="batch"`) and create the batch.
  Each step is stored before the next, and a batch is found again by its metadata before one is
  created, so a worker killed in between neither uploads nor creates twice. A capped sweep
  reserves the batch's worst case (batch price) first; no room = not created, the sweep stops.
- `poll`: follow the batch (validating -> in_progress -> finalizing -> completed / failed /
  expired / cancelled); at its end `ingest` its output and error files.
- `ingest`: match lines by `custom_id` (the output's order is not the input's) into exactly one row
  per request, with the online rows' columns and the batch price as `cost_usd`; error lines become
  failed rows with the provider's reason; requests an expired batch did not reach go into a new
  batch; lines missing from both files become failed rows. When no row of the sweep is missing,
  the finalizer is due (it runs once: `claim_finalizer`).
- `cancel`: ask the provider to cancel; polling ingests what was done.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import openai

from gridtune import pricing
from gridtune.errors import UserError
from gridtune.sweep import SweepConfig, request_at
from models import Batch, BatchState, RowState, SweepState, store
from models.schema import Sweep, utcnow
from worker import llm
from worker.context import WorkerContext
from worker.generation import build_messages, request_params
from worker.ratelimit.spend import sweep_budget_key
from worker.tokens import count_messages, encoding_name

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
METADATA_KEY = "gridtune_batch"
UNFINISHED_CODES = frozenset({"batch_expired"})  # lines worth sending again in a new batch


# --- building input files ---------------------------------------------------------------------------
def custom_id(sweep_id: int, index: int) -> str:
    return f"gridtune-{sweep_id}-{index}"


def index_of(sweep_id: int, value: str) -> int | None:
    prefix = f"gridtune-{sweep_id}-"
    if not value.startswith(prefix) or not value[len(prefix):].isdigit():
        return None
    return int(value[len(prefix):])


def input_line(config: SweepConfig, sweep_id: int, index: int) -> bytes:
    """One request as a batch input line: the exact body the online mode sends."""
    request = request_at(config, index)
    body = request_params(config, build_messages(config, request.prompt))
    line = {"custom_id": custom_id(sweep_id, index), "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def to_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as [start, stop) pairs."""
    ranges: list[list[int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
    return ranges


def indices_of(ranges: list[list[int]]) -> Iterator[int]:
    for start, stop in ranges:
        yield from range(start, stop)


def plan_batches(config: SweepConfig, sweep_id: int, indices: Iterable[int], max_requests: int,
                 max_bytes: int) -> list[list[list[int]]]:
    """Cut sorted `indices` into batches of at most `max_requests` requests and `max_bytes` bytes
    of input file; each batch as [start, stop) ranges. Builds every line once to measure it."""
    batches: list[list[list[int]]] = []
    current: list[int] = []
    size = 0
    for index in indices:
        length = len(input_line(config, sweep_id, index))
        if current and (len(current) >= max_requests or size + length > max_bytes):
            batches.append(to_ranges(current))
            current, size = [], 0
        current.append(index)
        size += length
    if current:
        batches.append(to_ranges(current))
    return batches


def input_file(config: SweepConfig, sweep_id: int, ranges: list[list[int]]) -> bytes:
    return b"".join(input_line(config, sweep_id, index) for index in indices_of(ranges))


# --- the steps ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """What to do next for a batch: poll again in `poll_in` seconds, or nothing (None)."""

    poll_in: float | None = None
    new_batches: tuple[int, ...] = ()  # batches to submit (the rest of an expired one)
    finalize: bool = False  # every row of the sweep exists: run the finalizer


def _reserve(ctx: WorkerContext, sweep: Sweep, config: SweepConfig, batch: Batch) -> bool:
    """The spend cap, before a batch is created: reserve its worst case at the batch price."""
    if sweep.max_cost_usd is None or batch.reserved_usd is not None:
        return True
    encoding = encoding_name(config.model.name)
    prompt_tokens = sum(count_messages(build_messages(config, request_at(config, i).prompt), encoding)
                        for i in indices_of(batch.ranges))
    worst = pricing.inference_cost(config.model.name, prompt_tokens,
                                   batch.request_count * config.model.max_output_tokens, "batch")
    if worst is None or not ctx.spend.reserve(sweep_budget_key(sweep.id, sweep.created_at), worst, sweep.max_cost_usd):
        return False
    store.update_batch(ctx.engine, batch.id, reserved_usd=worst)
    return True


def submit(ctx: WorkerContext, batch_id: int) -> Step:
    """Upload the batch's input file and create it at the provider (idempotent; see the module doc)."""
    engine, settings = ctx.engine, ctx.settings
    batch = store.get_batch(engine, batch_id)
    if batch.provider_batch_id is not None or batch.ingested_at is not None:
        return Step(poll_in=0 if batch.ingested_at is None else None)
    sweep = store.get_sweep_by_id(engine, batch.sweep_id)
    config = store.sweep_config(sweep)
    if sweep.state == SweepState.STOPPED:
        return _not_sent(ctx, sweep, batch, f"not sent: the sweep was stopped ({sweep.stop_reason})", "stopped")
    if not _reserve(ctx, sweep, config, batch):
        reason = f"spend cap reached: this batch could cost more than is left of ${sweep.max_cost_usd:.4f}"
        store.stop_sweep(engine, sweep.id, reason)
        return _not_sent(ctx, sweep, batch, f"not sent: {reason}", "spend_cap")
    client = ctx.client
    tag = f"{sweep.id}:{batch.id}"
    if batch.input_file_id is None:
        content = input_file(config, sweep.id, batch.ranges)
        uploaded = client.files.create(file=(f"gridtune-{tag.replace(':', '-')}.jsonl", content), purpose="batch")
        if not store.update_batch(engine, batch.id, unless_set="input_file_id", input_file_id=uploaded.id):
            client.files.delete(uploaded.id)  # another delivery of this task stored its upload first
        batch = store.get_batch(engine, batch_id)
    existing = _find_created(client, tag, batch.input_file_id)
    created = existing or client.batches.create(
        input_file_id=batch.input_file_id, endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
        metadata={METADATA_KEY: tag})
    store.update_batch(engine, batch.id, provider_batch_id=created.id, status=created.status)
    log.info("sweep %s: batch %s (%d requests) created as %s", sweep.name, batch.id, batch.request_count, created.id)
    return Step(poll_in=settings.batch_poll_seconds)


def _find_created(client: openai.OpenAI, tag: str, input_file_id: str):
    """A batch this tag already created (a worker died before storing its id), else None."""
    for found in client.batches.list(limit=100):
        if (found.metadata or {}).get(METADATA_KEY) == tag and found.input_file_id == input_file_id:
            return found
    return None


def poll(ctx: WorkerContext, batch_id: int) -> Step:
    """Follow a created batch; at its end, ingest it."""
    batch = store.get_batch(ctx.engine, batch_id)
    if batch.ingested_at is not None:
        return Step()
    remote = ctx.client.batches.retrieve(batch.provider_batch_id)
    counts = remote.request_counts
    store.update_batch(ctx.engine, batch.id, status=remote.status, output_file_id=remote.output_file_id,
                       error_file_id=remote.error_file_id,
                       completed=counts.completed if counts else None, failed=counts.failed if counts else None)
    if remote.status not in BatchState.FINAL:
        return Step(poll_in=ctx.settings.batch_poll_seconds)
    error = None
    if remote.status == "failed" and remote.errors and remote.errors.data:
        first = remote.errors.data[0]
        error = f"{first.code}: {first.message}" + (f" (line {first.line})" if first.line else "")
    output = ctx.client.files.content(remote.output_file_id).content if remote.output_file_id else b""
    errors = ctx.client.files.content(remote.error_file_id).content if remote.error_file_id else b""
    return ingest(ctx, store.get_batch(ctx.engine, batch_id), output, errors, batch_error=error)


def cancel(ctx: WorkerContext, batch_id: int) -> Step:
    """Ask the provider to cancel a created batch; polling then ingests what was done."""
    batch = store.get_batch(ctx.engine, batch_id)
    if batch.provider_batch_id is None or batch.ingested_at is not None:
        return Step()
    try:
        remote = ctx.client.batches.cancel(batch.provider_batch_id)
        store.update_batch(ctx.engine, batch.id, status=remote.status)
    except openai.BadRequestError as exc:  # it ended meanwhile
        log.info("batch %s: not cancelled: %s", batch.provider_batch_id, exc.message)
    return Step(poll_in=min(ctx.settings.batch_poll_seconds, 5.0))


# --- results --------------------------------------------------------------------------------------
def _base_row(config: SweepConfig, sweep_id: int, index: int, **values: Any) -> dict[str, Any]:
    request = request_at(config, index)
    return {"sweep_id": sweep_id, "request_index": index, "repeat": request.repeat, "params": request.params,
            "prompt": request.prompt, "input_text": request.input_text, "finished_at": utcnow(), "attempts": 1,
            "rate_limited": 0, **values}


def _ok_row(config: SweepConfig, sweep_id: int, index: int, body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices") or []
    choice = choices[0] if choices else {}
    content = (choice.get("message") or {}).get("content")
    usage = body.get("usage") or {}
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    cost = (pricing.inference_cost(config.model.name, prompt_tokens, completion_tokens, "batch")
            if prompt_tokens is not None and completion_tokens is not None else None)
    values = dict(model=body.get("model"), finish_reason=choice.get("finish_reason"), response_text=content,
                  prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=cost)
    if not content:
        return _base_row(config, sweep_id, index, state=RowState.FAILED, error_kind="empty",
                         error="the model returned no text", **values)
    return _base_row(config, sweep_id, index, state=RowState.OK, **values)


def _error_kind(status: int) -> str:
    if status in (400, 422):
        return "bad_request"
    if status == 404:
        return "not_found"
    return "server_error" if status >= 500 else "client_error"


def ingest(ctx: WorkerContext, batch: Batch, output: bytes, errors: bytes, *, batch_error: str | None = None) -> Step:
    """Store exactly one row per request of an ended batch (see the module docstring).

    `output` and `errors` are the provider's output and error files (JSON lines, any order).
    Returns the next step: new batches for what an expired batch did not reach, and whether the
    finalizer is due. Only one caller ingests a batch (claimed first); should it die half-way,
    re-running `sweep` sends the requests still without a row again.
    """
    engine = ctx.engine
    if not store.update_batch(engine, batch.id, unless_set="ingested_at", ingested_at=utcnow()):
        return Step()
    sweep = store.get_sweep_by_id(engine, batch.sweep_id)
    config = store.sweep_config(sweep)
    expected = set(indices_of(batch.ranges))
    rows: dict[int, dict[str, Any]] = {}
    resend: list[int] = []
    for raw in (output + b"\n" + errors).splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            index = index_of(sweep.id, str(line.get("custom_id") or ""))
        except (ValueError, AttributeError):  # an unreadable line: its request ends up "missing"
            log.warning("batch %s: skipping an unreadable result line", batch.provider_batch_id)
            continue
        if index is None or index not in expected or index in rows:
            continue
        response, error = line.get("response"), line.get("error")
        if response and response.get("status_code") == 200:
            rows[index] = _ok_row(config, sweep.id, index, response.get("body") or {})
        elif response:
            status = int(response.get("status_code") or 0)
            message = ((response.get("body") or {}).get("error") or {}).get("message") or "no reason given"
            rows[index] = _base_row(config, sweep.id, index, state=RowState.FAILED, error_kind=_error_kind(status),
                                    error=llm.redact(f"HTTP {status}: {message}", ctx.settings)[:2000])
        elif error and error.get("code") in UNFINISHED_CODES and sweep.state != SweepState.STOPPED:
            resend.append(index)
            rows[index] = None  # handed to a new batch
        else:
            code = (error or {}).get("code") or "error"
            kind = "stopped" if code == "batch_cancelled" else "batch_error"
            text = f"not sent: {code}" if code in ("batch_cancelled", "batch_expired") else f"{code}"
            rows[index] = _base_row(config, sweep.id, index, state=RowState.FAILED, error_kind=kind,
                                    error=f"{text}: {(error or {}).get('message') or ''}".strip(": ")[:2000])
    for index in sorted(expected - set(rows)):
        reason = (f"batch {batch.provider_batch_id} {batch_error and 'failed: ' + batch_error or 'ended'}; "
                  "this request is missing from its output and error files")
        rows[index] = _base_row(config, sweep.id, index, state=RowState.FAILED, error_kind="batch_missing",
                                error=llm.redact(reason, ctx.settings)[:2000])
    stored = [row for row in rows.values() if row is not None]
    store.insert_generations(engine, stored)
    new_batches: tuple[int, ...] = ()
    if resend:
        new_batches = tuple(store.add_batches(engine, sweep.id, plan_batches(
            config, sweep.id, sorted(resend), ctx.settings.batch_max_requests, ctx.settings.batch_max_bytes)))
    _settle(ctx, sweep, batch, stored)
    log.info("sweep %s: batch %s ingested: %d rows, %d sent again", sweep.name, batch.id, len(stored), len(resend))
    missing = store.sweep_counts(engine, store.get_sweep_by_id(engine, sweep.id)).missing
    return Step(new_batches=new_batches, finalize=missing == 0)


def _settle(ctx: WorkerContext, sweep: Sweep, batch: Batch, stored: list[dict[str, Any]]) -> None:
    if batch.reserved_usd is None or sweep.max_cost_usd is None:
        return
    actual = sum(row.get("cost_usd") or 0.0 for row in stored)
    ctx.spend.settle(sweep_budget_key(sweep.id, sweep.created_at), batch.reserved_usd, actual)


def give_up(ctx: WorkerContext, batch_id: int, exc: Exception) -> Step:
    """The API refused a batch step for good (4xx), or this worker cannot call it (UserError: no
    key): its requests become failed rows with the reason; auth, permission and quota refusals
    stop the sweep, as online."""
    failure = llm.classify(exc)
    batch = store.get_batch(ctx.engine, batch_id)
    sweep = store.get_sweep_by_id(ctx.engine, batch.sweep_id)
    reason = llm.redact(str(exc) if isinstance(exc, UserError) else failure.message, ctx.settings)
    if failure.stops_sweep or isinstance(exc, UserError):  # e.g. no API key in this worker
        store.stop_sweep(ctx.engine, sweep.id, reason)
    if batch.ingested_at is not None:
        return Step()
    if batch.reserved_usd is not None and sweep.max_cost_usd is not None and batch.provider_batch_id is None:
        ctx.spend.settle(sweep_budget_key(sweep.id, sweep.created_at), batch.reserved_usd, 0.0)
    log.error("sweep %s: batch %s: %s", sweep.name, batch.id, reason)
    return _not_sent(ctx, sweep, batch, f"batch refused: {reason}", failure.kind)


def _not_sent(ctx: WorkerContext, sweep: Sweep, batch: Batch, reason: str, kind: str) -> Step:
    """A batch that will not be created: one failed row per request, so the sweep can still end."""
    config = store.sweep_config(sweep)
    if not store.update_batch(ctx.engine, batch.id, unless_set="ingested_at", status="not_sent",
                              ingested_at=utcnow(), error=reason[:2000]):
        return Step()
    rows = [_base_row(config, sweep.id, index, state=RowState.FAILED, error_kind=kind, error=reason[:2000],
                      attempts=0) for index in indices_of(batch.ranges)]
    store.insert_generations(ctx.engine, rows)
    missing = store.sweep_counts(ctx.engine, store.get_sweep_by_id(ctx.engine, sweep.id)).missing
    return Step(finalize=missing == 0)
