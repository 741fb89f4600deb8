"""Reliability: one row per request whatever happens (worker SIGKILL, broker loss, API faults,
database outage), and the finalizer runs once.

Real processes throughout: `celery -A worker worker` processes, the producer CLI in a subprocess,
Redis, PostgreSQL and the local OpenAI-compatible server. No fixed sleeps: every wait polls with
a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import threading
import time

import pytest
import redis

import localapi
from producer.recovery import broker_idle
from tests.acceptance.helpers import (
    assert_one_row_per_request,
    consuming_workers,
    free_port,
    generation_rows,
    log_tails,
    producer_env,
    query,
    resume_counts,
    row_count,
    run_producer,
    small_config,
    sweep_row,
    wait_finished,
    worker_env,
)
from tests.support import wait_for

pytestmark = pytest.mark.timeout(240)


# --- 1. worker killed ----------------------------------------------------------------------------
VISIBILITY_TIMEOUT = 20  # long enough that a dead worker's messages cannot be restored by chance
RESTORE_INTERVAL = max(1, min(10, VISIBILITY_TIMEOUT // 4))  # worker/app.py::celery_config


def held_messages(r: redis.Redis, sweep_id: int) -> set[int]:
    """Request indices of this sweep's messages recorded in the broker's `unacked` hash."""
    held = set()
    for raw in r.hvals("unacked"):
        payload = json.loads(raw)[0]  # kombu stores [message, exchange, routing_key]
        sweep, index = json.loads(base64.b64decode(payload["body"]))[0][:2]
        if sweep == sweep_id:
            held.add(index)
    return held


def test_worker_sigkilled_twice(redis_db, postgres_db, start_workers, tmp_path):
    """SIGKILL a worker early, then another while it holds many tasks in flight. Their unacked
    messages come back within visibility_timeout + the restore interval (the workers record when
    each request started); at most one message per killed worker is lost outright (popped, not
    yet recorded as unacked), and `status --watch` resends exactly those by itself (the stall
    watchdog). Every request ends with exactly one ok row, finalizer once."""
    total = 240
    with localapi.running(latency_ms=300) as api:
        env = worker_env(redis_db, postgres_db, api, tmp_path / "gridtune-data",
                         GRIDTUNE_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT))
        config = small_config(tmp_path / "kill.toml", total)
        # Enqueue first; each kill is then timed on what the broker records, polled fast (the
        # sweep must still be running, however slowly this machine runs the test itself).
        sent = run_producer(["sweep", "--config", str(config), "--name", "kill"], producer_env(env), tmp_path, 60)
        assert sent.returncode == 0, sent.stderr
        sweep_id = sweep_row(postgres_db, "kill").id
        r = redis.Redis.from_url(redis_db)
        assert r.llen("gridtune") == total
        kills: list[tuple[float, set[int]]] = []  # (when, indices the dead worker held)
        # Early: as soon as the first worker has started taking messages.
        first = start_workers(1, env, concurrency=50, wait=False)[0]
        wait_for(lambda: r.hlen("unacked") >= 5 or not first.alive(), 60, 0.02, "the first worker to take messages")
        first.signal(signal.SIGKILL)
        first.process.wait(10)
        kills.append((time.time(), held_messages(r, sweep_id)))
        assert row_count(postgres_db, "kill") < total

        # Late: while it holds many unacked (in-flight) messages of its own.
        second = start_workers(1, env, concurrency=50, wait=False)[0]
        wait_for(lambda: len(held_messages(r, sweep_id) - kills[0][1]) >= 20 or not second.alive(), 90, 0.02,
                 "many tasks in flight")
        rows_at_kill = row_count(postgres_db, "kill")
        second.signal(signal.SIGKILL)
        second.process.wait(10)
        kills.append((time.time(), held_messages(r, sweep_id)))
        assert rows_at_kill < total, "the sweep finished before the second kill"
        assert len(kills[1][1] - kills[0][1]) >= 10  # its messages are still owed to the queue

        third = start_workers(1, env, concurrency=50)
        watch = run_producer(["status", "kill", "--watch", "--interval", "0.5"],
                             producer_env(env, GRIDTUNE_STALL_SECONDS="3"), tmp_path, 180)
        assert watch.returncode == 0, watch.stderr + log_tails(third)
    resent = sum(int(n) for n in re.findall(r"stalled: .* sent (\d+) again", watch.stderr))
    print(f"messages lost with the killed workers (resent by the stall watchdog): {resent}")
    assert resent <= len(kills), f"{resent} messages lost by {len(kills)} SIGKILLs: {watch.stderr}"
    sweep = sweep_row(postgres_db, "kill")
    assert sweep.state == "done" and sweep.finalizer_runs == 1, sweep
    assert_one_row_per_request(postgres_db, "kill", total)

    # Restore latency: a request a dead worker held started again no later than the visibility
    # timeout plus the restore interval after the kill (with slack for a busy machine; kombu's
    # default 10 s x 10 throttle would take up to 100 s more).
    started = dict(query(postgres_db, "SELECT request_index, started_at FROM generations WHERE sweep_id = :s",
                         s=sweep_id))
    bound = VISIBILITY_TIMEOUT + 2 * RESTORE_INTERVAL + 10
    for killed_at, held in kills:
        late = {i: round(started[i].timestamp() - killed_at, 1) for i in held
                if started[i].timestamp() - killed_at > bound}
        assert not late, f"requests held by a killed worker started again more than {bound}s after the kill: {late}"


# --- 2. broker lost ------------------------------------------------------------------------------
def test_broker_lost_and_restarted_empty(private_redis, postgres_db, start_workers, tmp_path):
    """The broker dies mid-sweep and comes back empty (queue, unacked and chord counter gone).
    Workers reconnect by themselves (kombu's crash on this path is guarded: worker/broker.py); a
    task that was running when Redis vanished is retried, never stored as a failed row; re-running
    `sweep` with the same name (the documented recovery) sends only the missing requests and
    completes the sweep, finalizer once."""
    total = 300
    with localapi.running(latency_ms=300) as api:
        env = worker_env(private_redis.url, postgres_db, api, tmp_path / "gridtune-data")
        config = small_config(tmp_path / "broker.toml", total)
        # Enqueue first, then start the workers: the broker is lost while most messages are still
        # queued, polled on the queue itself (however slowly the machine runs the producer).
        sent = run_producer(["sweep", "--config", str(config), "--name", "broker"], producer_env(env), tmp_path, 60)
        assert sent.returncode == 0, sent.stderr
        r = redis.Redis.from_url(private_redis.url)
        assert r.llen("gridtune") == total
        workers = start_workers(2, env, concurrency=10)
        wait_for(lambda: r.llen("gridtune") <= total - 50, 60, 0.02, "the sweep to get going")
        private_redis.stop()
        at_loss = row_count(postgres_db, "broker")
        assert at_loss < total, "the sweep finished before the broker was lost"
        private_redis.start()  # same port, empty

        # Both workers consume again from the new server (what it records: their blocked BRPOPs).
        wait_for(lambda: consuming_workers(r) >= 2 or not all(w.alive() for w in workers), 60, 0.2,
                 "both workers to reconnect")
        assert all(w.alive() for w in workers), "a worker died instead of reconnecting\n" + log_tails(workers)
        sweep_id = sweep_row(postgres_db, "broker").id

        # Tasks caught by the loss come back as retries through the new broker; wait until the
        # broker holds nothing (queued, unacked, in flight) and the row count has not moved since.
        last = {"rows": -1}

        def settled():
            rows = row_count(postgres_db, "broker")
            idle = broker_idle(r, ("gridtune",)) and r.zcard(f"gridtune:inflight:{sweep_id}") == 0
            steady, last["rows"] = idle and rows == last["rows"], rows
            return steady
        wait_for(settled, 90, 0.5, "the requests caught by the loss to settle")
        rows = generation_rows(postgres_db, "broker")
        assert len(rows) < total
        # Redis errors mean "retry later", never a failed row (worker/tasks.py::generate).
        failed = [row for row in rows if row.state != "ok"]
        assert failed == [], f"{len(failed)} requests caught by the broker loss were stored as failed: {failed[:3]}"
        assert sweep_row(postgres_db, "broker").finalizer_runs == 0  # the old chord can never fire

        again = run_producer(["sweep", "--config", str(config), "--name", "broker", "--wait", "--timeout", "90"],
                             producer_env(env), tmp_path, 120)
        assert again.returncode == 0, again.stderr + "\n" + log_tails(workers)
        sent_again, already = resume_counts(again.stderr)
        assert sent_again + already == total and already >= len(rows) and sent_again > 0, again.stderr
        assert all(w.alive() for w in workers), "a worker died instead of reconnecting\n" + log_tails(workers)
        assert not any("Unrecoverable error" in w.output() for w in workers), log_tails(workers)
    sweep = sweep_row(postgres_db, "broker")
    assert sweep.state == "done" and sweep.finalizer_runs == 1, sweep
    assert_one_row_per_request(postgres_db, "broker", total)


# --- 3. API faults -------------------------------------------------------------------------------
def test_api_faults_every_request_ends_ok_or_failed_with_reason(redis_db, postgres_db, start_workers, tmp_path):
    """20% of calls fail (500, timeout, dropped connection, malformed JSON, 429 storm): every
    request ends ok or failed with error_kind + error, none missing, and the chord body runs."""
    total = 200
    with localapi.running(fault_rate=0.2, faults=("500", "timeout", "drop", "malformed", "429"),
                          hang_seconds=5) as api:
        env = worker_env(redis_db, postgres_db, api, tmp_path / "gridtune-data", GRIDTUNE_REQUEST_TIMEOUT="1", GRIDTUNE_MAX_ATTEMPTS="2")
        config = small_config(tmp_path / "faults.toml", total)
        start_workers(2, env, concurrency=25)
        done = run_producer(["sweep", "--config", str(config), "--name", "faults", "--wait", "--timeout", "150"],
                            producer_env(env), tmp_path, 180)
        faults = api.stats()["faults"]
    assert done.returncode in (0, 1), done.stderr  # 1 = the sweep ended `failed` (too few examples)
    rows = assert_one_row_per_request(postgres_db, "faults", total, all_ok=False)
    for row in rows:
        if row.state != "ok":
            assert row.state == "failed" and row.error_kind and row.error, row
    assert {"500", "timeout", "drop", "malformed", "429"} <= set(faults), faults
    kinds = {row.error_kind for row in rows if row.state == "failed"}
    assert kinds, "with 2 attempts at 20% faults some requests should fail"
    assert kinds <= {"server_error", "timeout", "connection", "malformed", "rate_limited"}, kinds
    sweep = sweep_row(postgres_db, "faults")
    assert sweep.state in ("done", "failed") and sweep.finalizer_runs == 1, sweep


# --- 4. database away ----------------------------------------------------------------------------
class FlakyTcpProxy:
    """127.0.0.1:<port> -> target, in a background event loop; `down()` closes every connection and
    refuses (accepts and closes) new ones until `up()`."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self.available = True
        self.refused = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()

    async def _handle(self, reader, writer):
        if not self.available:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()
                src_writer = writer if src is reader else up_writer
                src_writer.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)

    def _set(self, available: bool):
        async def apply():
            self.available = available
            if not available:
                for w in list(self._writers):
                    w.transport.abort()
                self._writers.clear()
        asyncio.run_coroutine_threadsafe(apply(), self._loop).result(5)

    def down(self):
        self._set(False)

    def up(self):
        self._set(True)


def test_database_away_for_a_few_seconds(redis_db, postgres_db, start_workers, tmp_path):
    """Postgres becomes unreachable for ~5 s mid-sweep (connections cut, new ones refused): tasks
    wait and retry, nothing is lost or failed, one row per request, finalizer once."""
    from sqlalchemy.engine import make_url

    total = 200
    direct = make_url(postgres_db)
    with localapi.running(latency_ms=100) as api, FlakyTcpProxy(direct.host, direct.port or 5432) as proxy:
        proxied = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        env = worker_env(redis_db, proxied, api, tmp_path / "gridtune-data")
        config = small_config(tmp_path / "db.toml", total)
        start_workers(2, env, concurrency=15)
        # The producer talks to the database directly: only the workers see the outage.
        sent = run_producer(["sweep", "--config", str(config), "--name", "dbaway"],
                            producer_env(env, DATABASE_URL=postgres_db), tmp_path, 60)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: row_count(postgres_db, "dbaway") >= 20, 60, 0.1, "the sweep to get going")
        proxy.down()
        at_outage = row_count(postgres_db, "dbaway")
        wait_for(lambda: proxy.refused >= 3, 20, 0.1, "workers to hit the outage")
        deadline = time.monotonic() + 5
        wait_for(lambda: time.monotonic() >= deadline, 10, 0.1, "the outage to last 5 s")
        during = row_count(postgres_db, "dbaway")
        assert during == at_outage, "rows arrived while the database was away (the proxy leaks)"
        assert during < total, "the sweep finished before the outage"
        proxy.up()
        sweep = wait_finished(postgres_db, "dbaway", 120)
    assert sweep.state == "done" and sweep.finalizer_runs == 1, sweep
    assert_one_row_per_request(postgres_db, "dbaway", total)
