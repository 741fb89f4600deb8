"""Celery's own CPU per task: the floor under gridtune's worker CPU per row (issue 14, part 4).

A chord of N tasks that do nothing, published the way `producer.enqueue.send_chord` publishes
`generate` (the same message fields: group, chord body, ignore_result), consumed by
`celery worker --pool threads` processes (one by default) configured exactly as a gridtune worker
(`worker.app.celery_config`: acks_late, reject_on_worker_lost, prefetch 1, JSON, task events,
Redis broker and result backend with the visibility timeout, kombu's client reuse). Whatever CPU
that worker spends per task is Celery's alone: no HTTP, no database, no rate budget.

    python bench/celery_floor.py --tasks 10000                   # events on, chord, 64 threads
    python bench/celery_floor.py --tasks 10000 --events off --concurrency 16
    python bench/celery_floor.py --tasks 10000 --no-chord
    python bench/celery_floor.py --tasks 10000 --procs 4          # 4 x 16 threads

The module is also the worker's app (`celery -A bench.celery_floor worker`): the tasks live here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery  # noqa: E402

from gridtune.settings import get_settings  # noqa: E402
from worker.app import celery_config  # noqa: E402 - also applies the kombu patches a worker gets

app = Celery("floor")
app.conf.update(celery_config(get_settings()))
app.conf.task_routes = {}
DONE_KEY = "gridtune-bench:floor-done"


@app.task(name="floor.noop", ignore_result=True)
def noop(sweep_id: int, index: int) -> None:
    """A header task with gridtune's arguments and nothing in its body."""


@app.task(name="floor.done")
def done(_results=None) -> None:
    """The chord body: say when the last header task has been counted."""
    import redis

    redis.Redis.from_url(app.conf.broker_url).set(DONE_KEY, repr(time.time()))


def publish(count: int, chord: bool) -> None:
    """`count` noop messages in kombu batches, with or without a chord around them."""
    from celery.utils import uuid

    queue = app.amqp.queues[app.conf.task_default_queue]
    group_id = uuid()
    body = done.si()
    if chord:
        body.freeze(uuid(), group_id=group_id)
        app.backend.set_chord_size(group_id, count)
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        producer.maybe_declare(queue)
        for index in range(count):
            task_id = uuid()
            extra = dict(group_id=group_id, group_index=index, chord=body) if chord else {}
            headers, properties, message, _ = app.amqp.create_task_message(
                task_id, noop.name, (1, index), {}, root_id=task_id, ignore_result=True,
                argsrepr=f"(1, {index})", kwargsrepr="{}", **extra)
            producer.publish(message, exchange="", routing_key=queue.name, serializer="json",
                             headers=headers, delivery_mode=2, retry=True, **properties)


def main() -> int:
    from bench.common import REDIS_URL, bench_env, flush_redis, md_table, proc_cpu_seconds, server_cpu_seconds
    from bench.throughput import start_workers, stop_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=1, help="worker processes (threads split among them)")
    parser.add_argument("--concurrency", type=int, default=64, help="threads in all")
    parser.add_argument("--events", choices=("on", "off"), default="on")
    parser.add_argument("--no-chord", action="store_true", help="plain tasks: no chord counter")
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args()

    import redis

    flush_redis()
    client = redis.Redis.from_url(REDIS_URL)
    env = bench_env(GRIDTUNE_TASK_EVENTS="true" if args.events == "on" else "false")
    os.environ.update(env)
    logdir = Path(tempfile.mkdtemp(prefix="gridtune-floor-"))
    publish(args.tasks, chord=not args.no_chord)
    servers_before = server_cpu_seconds()
    # Started as the throughput benchmark starts gridtune's workers, on this module's app.
    workers = start_workers(args.procs, args.concurrency // args.procs, env, logdir, [], app="bench.celery_floor")

    def workers_cpu() -> float:
        return sum(proc_cpu_seconds(w.pid) for w in workers)

    queue = app.conf.task_default_queue
    first = first_cpu = None
    deadline = time.monotonic() + args.max_seconds
    try:
        while time.monotonic() < deadline:
            left = client.llen(queue)
            if first is None and left < args.tasks:  # consumption has begun: start-up is behind us
                first, first_cpu = time.monotonic(), workers_cpu()
                consumed_at_first = args.tasks - left
            finished = client.exists(DONE_KEY) if not args.no_chord else (
                left == 0 and client.hlen("unacked") == 0)
            if finished:
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"not done within {args.max_seconds} s; worker logs in {logdir}")
        wall, cpu = time.monotonic() - first, workers_cpu() - first_cpu
    finally:
        stop_workers(workers)
    servers_after = server_cpu_seconds()
    counted = args.tasks - consumed_at_first
    redis_ms = (servers_after["redis"] - servers_before["redis"]) * 1000 / args.tasks
    print(md_table(
        ["events", "chord", "procs x threads", "tasks", "wall s", "tasks/s", "worker CPU ms/task", "Redis CPU ms/task"],
        [[args.events, "no" if args.no_chord else "yes", f"{args.procs}x{args.concurrency // args.procs}", counted, wall, counted / wall,
          cpu * 1000 / counted, redis_ms]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
