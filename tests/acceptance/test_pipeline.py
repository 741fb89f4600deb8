"""Core pipeline, end to end with real processes: Redis broker, PostgreSQL, Celery workers, producer.

Issue "core pipeline": the default sweep completes with one ok row per request and one finalizer
run; re-running `sweep` under the same name enqueues only what is missing; the embedded command
(no broker, no key) completes and leaves a valid training file; a different config under an
existing name is refused with exit code 2.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.acceptance.helpers import (
    assert_one_row_per_request,
    enqueued_count,
    generation_rows,
    producer_env,
    query,
    run_producer,
    small_config,
    sweep_row,
    worker_env,
)
from tests.support import clean_env, wait_for

pytestmark = pytest.mark.timeout(240)


# --- tests ---------------------------------------------------------------------------------------
def test_default_sweep_three_workers(redis_db, postgres_db, local_api, start_workers, tmp_path):
    """The tutorial's 294 requests on 3 worker processes: 294 ok rows, finalizer once, fine-tune done."""
    env = worker_env(redis_db, postgres_db, local_api, tmp_path / "gridtune-data")
    start_workers(3, env, concurrency=20)
    started = time.monotonic()
    done = run_producer(["sweep", "--wait", "--timeout", "120"], producer_env(env), tmp_path, timeout=150)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = assert_one_row_per_request(postgres_db, "superhero", 294)
    assert len(rows) == 294
    sweep = sweep_row(postgres_db, "superhero")
    assert sweep.state == "done", sweep
    assert sweep.finalizer_runs == 1
    jobs = query(postgres_db, "SELECT backend, status FROM finetune_jobs")
    assert [(j.backend, j.status) for j in jobs] == [("openai", "succeeded")]
    # The local server saw one accepted call per request (no duplicate generation calls).
    assert local_api.stats()["accepted"] == 294
    print(f"default sweep on 3 workers: {time.monotonic() - started:.1f}s")


def test_resume_enqueues_only_missing(redis_db, postgres_db, local_api, start_workers, tmp_path):
    """The producer dies mid-enqueue (no workers yet); workers drain what was sent; re-running
    `sweep` under the same name enqueues exactly the missing requests and the sweep completes."""
    total = 600
    config = small_config(tmp_path / "big.toml", total)
    env = worker_env(redis_db, postgres_db, local_api, tmp_path / "gridtune-data")
    penv = producer_env(env, GRIDTUNE_ENQUEUE_BATCH="1")
    first = subprocess.Popen([sys.executable, "-m", "producer", "sweep", "--config", str(config), "--name", "resume"],
                             cwd=tmp_path, env=penv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    try:
        for line in first.stderr:
            if line.strip().startswith("enqueued 200"):
                first.send_signal(signal.SIGKILL)
                break
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL, "the producer finished before it could be killed"
    queued = redis.Redis.from_url(redis_db).llen("gridtune")
    assert 0 < queued < total, queued
    sweep = sweep_row(postgres_db, "resume")
    assert sweep.state == "running" and sweep.total_requests == total

    workers = start_workers(2, env, concurrency=40)
    wait_for(lambda: len(generation_rows(postgres_db, "resume")) >= queued, 60, 0.5, "the partial enqueue to drain")
    # Every delivered message has run (the queue is empty, nothing unacked): the chord of the dead
    # producer can never complete, so the finalizer has not run.
    r = redis.Redis.from_url(redis_db)
    wait_for(lambda: r.llen("gridtune") == 0 and r.hlen("unacked") == 0, 30, 0.2, "the queue to empty")
    stored = len(generation_rows(postgres_db, "resume"))
    assert stored == queued
    assert sweep_row(postgres_db, "resume").finalizer_runs == 0

    again = run_producer(["sweep", "--config", str(config), "--name", "resume", "--wait", "--timeout", "120"],
                         producer_env(env), tmp_path, timeout=150)
    assert again.returncode == 0, again.stderr
    assert enqueued_count(again.stderr) == total - stored
    assert_one_row_per_request(postgres_db, "resume", total)
    sweep = sweep_row(postgres_db, "resume")
    assert sweep.state == "done" and sweep.finalizer_runs == 1, sweep
    assert all(w.alive() for w in workers)

    # Nothing left to do: a third run enqueues nothing and leaves the finalizer count alone.
    third = run_producer(["sweep", "--config", str(config), "--name", "resume"], producer_env(env), tmp_path, timeout=60)
    assert third.returncode == 0, third.stderr
    assert enqueued_count(third.stderr) == 0
    assert sweep_row(postgres_db, "resume").finalizer_runs == 1


def test_embedded_default_sweep(tmp_path):
    """`python -m producer sweep --simulated` with no broker and no key: the simulated local
    server, in-process worker, SQLite; a validated train.jsonl; then a different config under the
    same name exits 2."""
    from worker.dataset import validate_example

    env = clean_env(GRIDTUNE_FINETUNE_POLL_SECONDS="0.5")
    done = run_producer(["sweep", "--simulated"], env, tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "the bundled sweeps/superhero.toml" in done.stderr
    assert "Its answers and models are SIMULATED" in done.stderr
    train = tmp_path / "gridtune-data" / "superhero" / "train.jsonl"
    lines = train.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 10
    for line in lines:
        assert validate_example(json.loads(line)) == [], line

    engine = create_engine(f"sqlite:///{tmp_path / 'gridtune.db'}")
    with engine.connect() as conn:
        state, runs = conn.execute(text("SELECT state, finalizer_runs FROM sweeps WHERE name='superhero'")).one()
        indices = [i for (i,) in conn.execute(text(
            "SELECT request_index FROM generations g JOIN sweeps s ON s.id=g.sweep_id WHERE s.name='superhero'"))]
        states = {s for (s,) in conn.execute(text("SELECT DISTINCT state FROM generations"))}
    engine.dispose()
    assert (state, runs) == ("done", 1)
    assert sorted(indices) == list(range(294))
    assert states == {"ok"}

    other = small_config(tmp_path / "other.toml", 12)
    refused = run_producer(["sweep", "--config", str(other), "--name", "superhero"], env, tmp_path, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "different config" in refused.stderr
    assert "Traceback" not in refused.stderr
