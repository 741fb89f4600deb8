"""Core pipeline, end to end with real processes: Redis broker, PostgreSQL, Celery workers, producer.

Issue "core pipeline": the default sweep completes with one ok row per request and one finalizer
run; re-running `sweep` under the same name enqueues only what is missing; the embedded command
(no broker, no key) completes and leaves a valid training file; a different config under an
existing name is refused with exit code 2.
"""

from __future__ import annotations

import json
import shutil
import socket
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.support import clean_env, wait_for

pytestmark = pytest.mark.timeout(240)


# --- helpers (kept local: these test files are self-contained) ------------------------------------
def small_config(path: Path, values: int, repeats: int = 1, backend: str = "none", label: str = "n") -> Path:
    """A one-dimension sweep of `values` x `repeats` requests with the fine-tune step off."""
    path.write_text(
        f"""
repeats = {repeats}
[dimensions]
{label} = {json.dumps(list(range(values)))}
[templates]
prompt = "Describe hero number {{{label}}} in two sentences."
input = "hero {{{label}}}"
[model]
max_output_tokens = 200
[finetune]
backend = "{backend}"
""",
        encoding="utf-8",
    )
    return path


def sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def query(db_url: str, sql: str, **params):
    """Run one query; retried for a while when PostgreSQL is out of connection slots (other test
    runs share the server)."""
    deadline = time.monotonic() + 30
    while True:
        engine = create_engine(sa_url(db_url), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql), params).all()
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            engine.dispose()


def sweep_row(db_url: str, name: str):
    rows = query(db_url, "SELECT id, state, finalizer_runs, total_requests, stop_reason FROM sweeps WHERE name = :n", n=name)
    return rows[0] if rows else None


def generation_rows(db_url: str, name: str):
    return query(
        db_url,
        "SELECT g.request_index, g.state, g.error_kind, g.error FROM generations g "
        "JOIN sweeps s ON s.id = g.sweep_id WHERE s.name = :n ORDER BY g.request_index",
        n=name,
    )


def assert_one_row_per_request(db_url: str, name: str, total: int, *, all_ok: bool = True) -> list:
    rows = generation_rows(db_url, name)
    indices = [r.request_index for r in rows]
    assert len(indices) == len(set(indices)), "duplicate rows for a request"
    assert sorted(indices) == list(range(total)), f"missing rows: {sorted(set(range(total)) - set(indices))[:20]}"
    if all_ok:
        bad = [r for r in rows if r.state != "ok"]
        assert not bad, f"{len(bad)} rows not ok, e.g. {bad[:3]}"
    return rows


def worker_env(broker: str, db_url: str, api, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "GRIDTUNE_DATA_DIR": str(data_dir),  # workers run in the repo root: keep datasets out of it
        "CELERY_BROKER_URL": broker,
        "DATABASE_URL": db_url,
        "OPENAI_API_KEY": "sk-test-pipeline",
        "OPENAI_BASE_URL": api.base_url,
        "GRIDTUNE_VISIBILITY_TIMEOUT": "15",
        "GRIDTUNE_MAX_INLINE_WAIT": "2",
        "GRIDTUNE_BACKOFF_CAP": "2",
        "GRIDTUNE_FINETUNE_POLL_SECONDS": "0.5",
        **extra,
    }


def producer_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """What the producer gets: the same settings minus the API key."""
    return clean_env(**{k: v for k, v in env.items() if k != "OPENAI_API_KEY"}, **extra)


def run_producer(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def enqueued_count(stderr: str) -> int:
    match = re.search(r"([\d,]+) requests enqueued", stderr)
    assert match, stderr
    return int(match.group(1).replace(",", ""))


class PrivateRedis:
    """A redis-server of this test's own, with no persistence (restarting it empties it). Tests use
    it instead of the shared 6379 one: other test runs' workers consume the same queue names."""

    def __init__(self, port: int, workdir: Path):
        self.port, self.workdir = port, workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required"
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.workdir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: self._ping(client), 10, 0.05, "the private redis-server")

    @staticmethod
    def _ping(client) -> bool:
        try:
            return client.ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(private_redis) -> str:
    """Overrides the shared-Redis fixture: a broker nobody else's workers listen to."""
    return private_redis.url


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
    """`python -m producer sweep` with no broker and no key: local server, in-process worker,
    SQLite; a validated train.jsonl; then a different config under the same name exits 2."""
    from worker.dataset import validate_example

    env = clean_env(GRIDTUNE_FINETUNE_POLL_SECONDS="0.5")
    done = run_producer(["sweep"], env, tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "LOCAL OpenAI-compatible server" in done.stderr
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
