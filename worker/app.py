"""The Celery app and the settings that suit this workload (documented in README, "Workers").

Many short I/O-bound tasks: a thread pool keeps hundreds of requests in flight per process;
acks_late + reject_on_worker_lost requeue the task of a worker that dies (the unique row key makes
the second run harmless); prefetch 1 leaves queued tasks to workers that have free slots; results
are tiny because the finalizer reads the database, never the chord's results.
"""

from __future__ import annotations

import logging
import sys

from celery import Celery
from celery.signals import worker_process_init

from gridtune.errors import UserError
from gridtune.settings import Settings, get_settings
from worker.broker import guard_closed_transport, reuse_sync_client

# kombu 5.7 can end a worker on broker loss with an AttributeError; make it a connection error
# that the consumer's reconnect loop handles; and it builds a Redis client per ack (worker/broker.py).
guard_closed_transport()
reuse_sync_client()

EMBEDDED_BACKEND = "worker.embedded:InProcessRedisBackend"


def result_backend_for(settings: Settings) -> str:
    if settings.result_backend:
        return settings.result_backend
    if settings.embedded:
        return EMBEDDED_BACKEND
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    raise UserError("set CELERY_RESULT_BACKEND: chords need a result backend (a Redis URL is best)")


def celery_config(settings: Settings) -> dict:
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # kombu scans for a dead worker's unacked messages every interval x throttle (10 s x 10 by
        # default): without these they come back up to ~100 s after the visibility timeout.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
    }
    if settings.embedded:
        transport["polling_interval"] = 0.01  # the 1 s default makes the memory broker crawl
    return dict(
        broker_url=settings.broker_url or "memory://localhost/",
        result_backend=result_backend_for(settings),
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_send_task_events=settings.task_events,  # Flower needs them
        # A "sent" event per enqueued task would double the producer's publishes.
        task_send_sent_event=False,
        worker_consumer="worker.consumer:Consumer",  # task events in batches (worker/consumer.py)
        result_expires=7 * 24 * 3600,  # never 0: that hangs chords
        task_default_queue="gridtune",
        task_routes={"gridtune.finetune_local": {"queue": "finetune"},
                     "gridtune.eval_finalize_local": {"queue": "finetune"}},
        worker_hijack_root_logger=False,
        # Arguments and results are shown in Flower and events: they are ids only, but say so.
        task_protocol=2,
    )


# One INFO line per HTTP request drowns the worker log (and costs CPU at hundreds per second).
for noisy in ("httpx", "httpx2"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_task_lines(settings: Settings) -> None:
    """Celery's per-task INFO lines ("Task … received", "… succeeded in …s") off unless
    GRIDTUNE_TASK_LOG_LINES: Celery reads these loggers' level once, when the worker starts."""
    level = logging.NOTSET if settings.task_log_lines else logging.WARNING
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(level)


app = Celery("gridtune", include=["worker.tasks", "worker.eval_tasks"])
try:
    app.conf.update(celery_config(get_settings()))
    quiet_task_lines(get_settings())
except UserError as exc:
    # A worker started with a bad environment: one line naming the variable, exit 2 (no traceback).
    print(f"gridtune: error: {exc}", file=sys.stderr)
    raise SystemExit(exc.exit_code) from None


@worker_process_init.connect
def _fresh_resources_after_fork(**_):
    # A prefork child must not reuse the parent's sockets (database pool, Redis, HTTP client).
    from models import dispose_engines
    from worker.context import reset_context

    dispose_engines()
    reset_context()
