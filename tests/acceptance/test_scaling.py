"""Scaling in and out during a live sweep, with real `celery -A worker worker` processes.

(a) SIGTERM = warm shutdown: the worker stops taking tasks, finishes the ones in flight, leaves no
    unacked message behind and exits; the other worker completes the sweep with exactly one ok row
    per request and one finalizer run.
(b) A worker added mid-sweep starts taking tasks at once and does a real share of the rest.

The local API answers with latency so that a sweep lasts long enough to act on it. No fixed
sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import redis

import localapi
from tests.acceptance.helpers import (
    assert_one_row_per_request,
    producer_env,
    row_count,
    run_producer,
    small_config,
    wait_finished,
    worker_env,
)
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)

RECEIVED = re.compile(r"Task gridtune\.generate\[([0-9a-f-]+)\] received")
SUCCEEDED = re.compile(r"Task gridtune\.generate\[([0-9a-f-]+)\] succeeded")
WARM_SHUTDOWN = "Warm shutdown"


def enqueue(config: Path, name: str, env: dict[str, str], cwd: Path) -> None:
    """`python -m producer sweep` without --wait: returns once every message is published."""
    result = run_producer(["sweep", "--config", str(config), "--name", name], producer_env(env), cwd, timeout=60)
    assert result.returncode == 0, result.stderr


# --- (a) scale in: SIGTERM is a warm shutdown ------------------------------------------------------
def test_sigterm_is_a_warm_shutdown_and_the_sweep_completes(redis_db, postgres_db, start_workers, tmp_path):
    total, name = 400, "scale-in"
    with localapi.running(latency_ms=300) as api:
        env = worker_env(redis_db, postgres_db, api, tmp_path / "data", GRIDTUNE_TASK_LOG_LINES="true")  # the test reads them
        leaving, staying = start_workers(2, env, concurrency=8)
        enqueue(small_config(tmp_path / "in.toml", total), name, env, tmp_path)
        r = redis.Redis.from_url(redis_db)

        # Mid-sweep, while the leaving worker has requests in flight.
        def busy() -> bool:
            log = leaving.output()
            return row_count(postgres_db, name) >= 40 and len(RECEIVED.findall(log)) > len(SUCCEEDED.findall(log))

        wait_for(busy, 60, 0.02, "the leaving worker to have requests in flight")
        leaving.signal(signal.SIGTERM)
        leaving.process.wait(30)  # TimeoutExpired fails the test: no warm shutdown within 30 s
        rows_when_gone = row_count(postgres_db, name)
        assert rows_when_gone < total, "the sweep finished before the worker left: nothing was tested"

        log = leaving.output()
        assert WARM_SHUTDOWN in log, log[-3000:]
        before, after = log.split(WARM_SHUTDOWN, 1)
        # It stopped taking tasks ...
        # (one message already on its way from the broker when the signal landed may still arrive;
        # a worker that kept consuming would receive one per freed thread, 8 and more)
        assert len(RECEIVED.findall(after)) <= 2, "tasks received after the warm shutdown began"
        # ... finished those it held (some of them after the signal) ...
        received, succeeded = RECEIVED.findall(log), SUCCEEDED.findall(log)
        assert received, log[-3000:]
        assert set(received) == set(succeeded), f"abandoned: {sorted(set(received) - set(succeeded))[:5]}"
        assert SUCCEEDED.findall(after), "nothing was in flight at the signal"
        # ... and exited cleanly, owing nothing to the queue. Only the staying worker holds messages now.
        assert leaving.process.returncode == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        owed = {json.loads(raw)[0]["headers"]["id"] for raw in r.hvals("unacked")}
        assert not owed & set(received), "the leaving worker left unacked messages behind"

        sweep = wait_finished(postgres_db, name, 60)
        assert staying.alive()
    assert sweep.state == "done", sweep
    assert sweep.finalizer_runs == 1
    assert_one_row_per_request(postgres_db, name, total)
    assert len(set(RECEIVED.findall(staying.output()))) + len(received) >= total  # the stayer did the rest


# --- (b) scale out: an added worker takes tasks at once --------------------------------------------
def test_worker_added_mid_sweep_takes_tasks_at_once(redis_db, postgres_db, start_workers, tmp_path):
    total, name = 300, "scale-out"
    with localapi.running(latency_ms=300) as api:
        env = worker_env(redis_db, postgres_db, api, tmp_path / "data", GRIDTUNE_TASK_LOG_LINES="true")  # the test reads them
        start_workers(1, env, prefix="first", concurrency=5)
        enqueue(small_config(tmp_path / "out.toml", total), name, env, tmp_path)
        wait_for(lambda: row_count(postgres_db, name) >= 10, 60, 0.1, "the sweep to start")

        added = start_workers(1, env, prefix="added", concurrency=5)[0]  # waits for " ready."
        rows_at_ready = row_count(postgres_db, name)
        assert rows_at_ready < total - 50, "the sweep is nearly over before the worker was added"
        wait_for(lambda: RECEIVED.search(added.output()), 10, 0.1, "the added worker to receive a task")

        sweep = wait_finished(postgres_db, name, 90)
        done_by_added = len(set(SUCCEEDED.findall(added.output())))
    assert sweep.state == "done", sweep
    assert sweep.finalizer_runs == 1
    assert_one_row_per_request(postgres_db, name, total)
    # Same concurrency as the first worker: it should take about half of what was left; ask a third.
    assert done_by_added >= (total - rows_at_ready) / 3, (done_by_added, rows_at_ready)
