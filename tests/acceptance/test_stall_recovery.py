"""The stall watchdog as users meet it (docs/reliability.md §3): `sweep --wait` and
`status --watch` resume a sweep whose missing requests nothing can deliver any more.

A SIGKILLed worker can take a message with it (popped by BRPOP, never recorded as unacked). The
test loses messages exactly that way, without the kill: it pops them from the broker's queue
before any worker runs. Then one worker drains the rest, the sweeps stall (rows missing, nothing
queued, unacked or in flight), and the producer commands resume them by themselves.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
import redis

import localapi
from tests.acceptance.helpers import (
    assert_one_row_per_request,
    log_tails,
    producer_env,
    run_producer,
    small_config,
    sweep_row,
    worker_env,
)
from tests.support import wait_for

pytestmark = pytest.mark.timeout(240)


def task_args(message: bytes) -> list:
    """(sweep_id, index) of a generate task message as kombu stores it in the queue."""
    return json.loads(base64.b64decode(json.loads(message)["body"]))[0]


def test_sweep_wait_and_status_watch_resume_a_stalled_sweep(private_redis, postgres_db, start_workers, tmp_path):
    total = 20
    r = redis.Redis.from_url(private_redis.url)
    with localapi.running() as api:
        env = worker_env(private_redis.url, postgres_db, api, tmp_path / "gridtune-data")
        penv = producer_env(env, GRIDTUNE_STALL_SECONDS="1")
        watched = small_config(tmp_path / "watched.toml", total, label="w")
        waited = small_config(tmp_path / "waited.toml", total, label="v")

        # `status --watch` case: enqueued by a plain `sweep`; one message lost.
        sent = run_producer(["sweep", "--config", str(watched), "--name", "watched"], penv, tmp_path, 60)
        assert sent.returncode == 0, sent.stderr
        watched_id = sweep_row(postgres_db, "watched").id
        assert task_args(r.rpop("gridtune"))[0] == watched_id

        # `sweep --wait` case: the producer follows its sweep; one of its messages is lost (kombu
        # pushes on the left and pops on the right: the leftmost message is the newest).
        waiting = subprocess.Popen([sys.executable, "-m", "producer", "sweep", "--config", str(waited), "--name",
                                    "waited", "--wait", "--timeout", "120"], cwd=tmp_path, env=penv, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: r.llen("gridtune") == 2 * total - 1 or waiting.poll() is not None, 60, 0.05,
                     "the second sweep to be enqueued")
            waited_id = sweep_row(postgres_db, "waited").id
            assert task_args(r.lpop("gridtune"))[0] == waited_id

            workers = start_workers(1, env, concurrency=10)
            watching = subprocess.Popen([sys.executable, "-m", "producer", "status", "watched", "--watch",
                                         "--interval", "0.2"], cwd=tmp_path, env=penv, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                watch_out, watch_err = watching.communicate(timeout=90)
            finally:
                watching.kill()
            wait_out, wait_err = waiting.communicate(timeout=90)
        finally:
            waiting.kill()

    assert waiting.returncode == 0, wait_err + log_tails(workers)
    assert "sweep waited stalled: 1 requests had no row" in wait_err and "sent 1 again" in wait_err, wait_err
    assert watching.returncode == 0, watch_err
    assert "sweep watched stalled: 1 requests had no row" in watch_err and "sent 1 again" in watch_err, watch_err
    assert "sweep watched: done" in watch_out, watch_out
    for name in ("watched", "waited"):
        sweep = sweep_row(postgres_db, name)
        assert sweep.state == "done" and sweep.finalizer_runs == 1, sweep
        assert_one_row_per_request(postgres_db, name, total)
