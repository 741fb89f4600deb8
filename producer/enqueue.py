"""Store a sweep and enqueue one task per request as a chord whose body is the finalizer.

Fast path: Celery's `chord(...)` subscribes to a result channel per task and builds every
signature up front (~530 tasks/s at 100k). Here each header task's message is built with Celery's
own `create_task_message` and published through one producer in kombu batches (pipelined LPUSH),
without per-task result subscriptions, routing or queue declarations, and the chord size is set in
the result backend *before* the first task goes out, exactly as `chord.run` would (after that, the
Redis backend counts header results and sends the body once). Memory stays flat: indices are
streamed, no signature list is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from celery import Celery
from celery.utils import uuid
from sqlalchemy import Engine

from gridtune.errors import UserError
from gridtune.sweep import SweepConfig
from models import store
from models.schema import Sweep
from worker.ratelimit.spend import SpendLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enqueued:
    sweep: Sweep
    created: bool
    sent: int
    already_done: int
    body_id: str | None  # the finalizer's task id (None when nothing was sent)
    group_id: str | None
    new_batches: int = 0  # batch mode: batches created for `sent` requests
    open_batches: int = 0  # batch mode: batches already in flight, followed again


def task_label(sweep_id: int, index: int, sweep_name: str | None) -> str:
    """How a generate task's arguments read in Flower and events: the ids, then the sweep's name."""
    return f"({sweep_id}, {index})" + (f" sweep {sweep_name!r}" if sweep_name else "")


def send_chord(
    app: Celery,
    sweep_id: int,
    indices: Iterable[int],
    count: int,
    *,
    batch: int = 1000,
    on_progress: Callable[[int], None] | None = None,
    sweep_name: str | None = None,
) -> tuple[str, str]:
    """Publish `count` generate tasks (one per index) as one chord; returns (group_id, body_id).

    `sweep_name` only labels the messages for people (Flower's "args": `(1, 39) sweep 'heroes'`);
    the arguments themselves stay `(sweep_id, index)`.
    """
    from worker.tasks import finalize, generate

    group_id, body_id = uuid(), uuid()
    body = finalize.si(sweep_id)
    body.freeze(body_id, group_id=group_id)
    app.backend.set_chord_size(group_id, count)
    # Messages are built and published directly: Task.apply_async would re-route, re-declare the
    # queue and re-read the config for every one of them (more than half the enqueue time).
    queue = app.amqp.queues[app.conf.task_default_queue]
    create_message = app.amqp.create_task_message
    sent = 0
    with app.producer_or_acquire() as producer, producer.batch(max_size=batch):
        producer.maybe_declare(queue)
        for position, index in enumerate(indices):
            task_id = uuid()
            headers, properties, message, _ = create_message(
                task_id, generate.name, (sweep_id, index), {},
                group_id=group_id, group_index=position, chord=body, root_id=task_id,
                ignore_result=True,  # no result to store; the chord still counts the task
                argsrepr=task_label(sweep_id, index, sweep_name), kwargsrepr="{}",
            )
            producer.publish(
                message, exchange="", routing_key=queue.name, serializer="json", headers=headers,
                delivery_mode=2, retry=True, **properties,
            )
            sent += 1
            if on_progress and sent % batch == 0:
                on_progress(sent)
    if sent != count:
        raise RuntimeError(f"expected to send {count} tasks, sent {sent}")
    if on_progress:
        on_progress(sent)
    return group_id, body_id


def open_spend_budget(engine: Engine, sweep: Sweep, config: SweepConfig, cap: float,
                       spend: SpendLimiter | None) -> None:
    """Store the cap, tell the shared budget what was spent, and refuse (UserError) a sweep whose
    cap leaves no room for one more reply of `max_output_tokens`."""
    from worker.spend import open_budget, require_price, worst_case_cost

    require_price(config)
    if sweep.max_cost_usd != cap:
        store.set_max_cost(engine, sweep.id, cap)
    if spend is None:
        from worker.context import get_context

        spend = get_context().spend
    counts = store.sweep_counts(engine, sweep)
    state = open_budget(spend, sweep, counts.cost_usd)
    if state.spent_usd + state.reserved_usd + worst_case_cost(config, 0) > cap:
        raise UserError(f"sweep {sweep.name!r} has spent ${state.spent_usd:.4f} (and reserved "
                        f"${state.reserved_usd:.4f}) of its ${cap:.4f} spend cap: pass a higher --max-cost to resume it")


def enqueue_sweep(
    app: Celery,
    engine: Engine,
    name: str,
    config: SweepConfig,
    *,
    replace_config: bool = False,
    batch: int = 1000,
    on_progress: Callable[[int], None] | None = None,
    max_cost_usd: float | None = None,
    spend: SpendLimiter | None = None,
    mode: str | None = None,
    max_requests: int = 50_000,
    max_bytes: int = 200_000_000,
) -> Enqueued:
    """Create the sweep (or resume it: only requests without an ok row are sent again).

    `mode` ("online" / "batch"; default: the sweep's stored mode, else the config's `[model] mode`)
    picks one task per request, or batches of at most `max_requests` requests and `max_bytes`
    bytes (`enqueue_batches`).
    The spend cap is `max_cost_usd`, else the config's `[model] max_cost_usd`, else the one the
    sweep already has; `spend` is the shared spend budget (default: this process's worker context).
    Raises UserError when a capped model has no price or a resumed sweep has already spent its cap.
    """
    cap = max_cost_usd if max_cost_usd is not None else config.model.max_cost_usd
    if cap is not None:
        from worker.spend import require_price

        require_price(config)
    sweep, created = store.create_or_resume_sweep(engine, name, config, replace_config=replace_config)
    cap = cap if cap is not None else sweep.max_cost_usd
    if cap is not None:
        open_spend_budget(engine, sweep, config, cap, spend)
    mode = mode or sweep.mode or config.model.mode
    if sweep.mode != mode:
        store.set_mode(engine, sweep.id, mode)
    if mode == "batch":
        return enqueue_batches(app, engine, sweep, created, max_requests=max_requests, max_bytes=max_bytes)
    if not created:
        forgotten = store.forget_failed_rows(engine, sweep.id)
        if forgotten:
            log.info("sweep %s: %d failed requests will be tried again", name, forgotten)
    done = store.ok_indices(engine, sweep.id)
    skip = done | _in_open_batches(engine, sweep.id)  # a batch sweep resumed --online: no request twice
    missing = sweep.total_requests - len(skip)
    if missing == 0:
        return Enqueued(sweep, created, 0, len(done), None, None)
    store.mark_enqueued(engine, sweep.id)
    indices = (i for i in range(sweep.total_requests) if i not in skip)
    group_id, body_id = send_chord(app, sweep.id, indices, missing, batch=batch, on_progress=on_progress,
                                   sweep_name=name)
    return Enqueued(store.get_sweep_by_id(engine, sweep.id), created, missing, len(done), body_id, group_id)


def _in_open_batches(engine: Engine, sweep_id: int) -> set[int]:
    from worker.batch import indices_of

    return {index for batch in store.open_batches(engine, sweep_id) for index in indices_of(batch.ranges)}


def enqueue_batches(app: Celery, engine: Engine, sweep: Sweep, created: bool, *, max_requests: int,
                    max_bytes: int) -> Enqueued:
    """Batch mode: the requests without an ok row and not in a batch still open become new pending
    batches, each with a submit task; open batches are followed again (a resume after a lost
    worker), never duplicated. `sent` counts the requests in new batches."""
    from worker.batch import plan_batches
    from worker.tasks import batch_poll, batch_submit

    if not created:
        store.forget_failed_rows(engine, sweep.id)
    config = store.sweep_config(sweep)
    done = store.ok_indices(engine, sweep.id)
    open_batches = store.open_batches(engine, sweep.id)
    in_flight = _in_open_batches(engine, sweep.id)
    wanted = [i for i in range(sweep.total_requests) if i not in done and i not in in_flight]
    if not wanted and not open_batches:
        return Enqueued(sweep, created, 0, len(done), None, None)
    store.mark_enqueued(engine, sweep.id)
    new_ids = store.add_batches(engine, sweep.id, plan_batches(config, sweep.id, wanted, max_requests, max_bytes))
    for batch in open_batches:
        if batch.provider_batch_id is None:
            batch_submit.apply_async((batch.id,))
        else:
            batch_poll.apply_async((batch.id,))
    for batch_id in new_ids:
        batch_submit.apply_async((batch_id,))
    log.info("sweep %s: %d new batches, %d open ones followed again", sweep.name, len(new_ids), len(open_batches))
    return Enqueued(store.get_sweep_by_id(engine, sweep.id), created, len(wanted), len(done), None, None,
                    new_batches=len(new_ids), open_batches=len(open_batches))
