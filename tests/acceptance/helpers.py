"""What the acceptance tests share: small sweep configs, database checks, process environments and
a private redis-server per test (other test runs' workers consume the same queue names on the
shared 6379 one)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.support import clean_env, wait_for


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
    rows = query(db_url, "SELECT id, state, finalizer_runs, total_requests, stop_reason FROM sweeps WHERE name = :n",
                 n=name)
    return rows[0] if rows else None


def generation_rows(db_url: str, name: str):
    return query(
        db_url,
        "SELECT g.request_index, g.state, g.error_kind, g.error FROM generations g "
        "JOIN sweeps s ON s.id = g.sweep_id WHERE s.name = :n ORDER BY g.request_index",
        n=name,
    )


def row_count(db_url: str, name: str) -> int:
    return query(db_url, "SELECT count(*) FROM generations g JOIN sweeps s ON s.id = g.sweep_id "
                         "WHERE s.name = :n", n=name)[0][0]


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
        "OPENAI_API_KEY": "sk-test-reliability",
        "OPENAI_BASE_URL": api.base_url,
        "GRIDTUNE_VISIBILITY_TIMEOUT": "10",
        "GRIDTUNE_MAX_INLINE_WAIT": "2",
        "GRIDTUNE_BACKOFF_CAP": "2",
        **extra,
    }


def producer_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    return clean_env(**{**{k: v for k, v in env.items() if k != "OPENAI_API_KEY"}, **extra})


def run_producer(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "producer", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def enqueued_count(stderr: str) -> int:
    match = re.search(r"([\d,]+) requests enqueued", stderr)
    assert match, stderr
    return int(match.group(1).replace(",", ""))


def resume_counts(stderr: str) -> tuple[int, int]:
    """(requests enqueued, already done) from `sweep`'s summary line."""
    match = re.search(r"([\d,]+) requests enqueued, ([\d,]+) already done", stderr)
    assert match, stderr
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


def wait_finished(db_url: str, name: str, timeout: float):
    return wait_for(lambda: (s := sweep_row(db_url, name)) is not None and s.state in ("done", "failed") and s,
                    timeout, 0.5, f"sweep {name} to finish")


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
        """Start (or restart, on the same port) and make sure the server answering is this one: a
        port chosen by free_port() can be taken by another test run in between."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required"
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.workdir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: self.process.poll() is not None or self._ping(client), 10, 0.05, "the private redis-server")
        assert self.process.poll() is None, f"redis-server could not listen on port {self.port} (taken?)"
        assert client.info("server")["process_id"] == self.process.pid, f"port {self.port} answers another server"

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


def consuming_workers(client: redis.Redis) -> int:
    """How many connections are blocked in BRPOP: each consuming worker has one (what the broker
    itself records, so it also tells when workers have reconnected to a restarted broker). Only
    meaningful on a private broker, where nothing else consumes."""
    clients = client.client_list()
    return sum(1 for c in clients if c.get("cmd") == "brpop" and "b" in c.get("flags", ""))


def log_tails(workers, lines: int = 40) -> str:
    """The end of each worker's log, for failure messages (a dead or stuck worker says why)."""
    parts = []
    for worker in workers:
        tail = worker.output().splitlines()[-lines:]
        state = "alive" if worker.alive() else f"exited {worker.process.returncode}"
        parts.append(f"--- {worker.name} ({state}) ---\n" + "\n".join(tail))
    return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
