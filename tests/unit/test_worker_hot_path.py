"""The worker's per-request path after issue 14's CPU work: what it reads and writes, the kombu
client reuse and the quiet per-task log lines (speed itself is measured in bench/, not here)."""

from __future__ import annotations

import logging

import pytest
from kombu import Connection, Exchange, Producer, Queue
from sqlalchemy import event

import worker.app  # noqa: F401 - installs the kombu patches, as in every worker process
from gridtune.settings import Settings
from gridtune.sweep import parse_config
from models import RowState, SweepState, get_engine, store
from models.schema import utcnow
from tests.unit.test_generation import CONFIG
from worker.app import quiet_task_lines


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/hot.db" if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    return get_engine(url)


def test_sweep_and_row_reads_the_head_the_config_and_whether_the_row_exists(engine):
    sweep, _ = store.create_or_resume_sweep(engine, "hot", parse_config(CONFIG))
    head, stored = store.sweep_and_row(engine, sweep.id, 3)
    assert not stored
    assert (head.id, head.name, head.state, head.fingerprint) == (sweep.id, "hot", SweepState.RUNNING, sweep.fingerprint)
    assert store.sweep_config(head).fingerprint == parse_config(CONFIG).fingerprint

    row = dict(sweep_id=sweep.id, request_index=3, repeat=0, params={"a": 1}, prompt="p", input_text="i",
               finished_at=utcnow(), state=RowState.OK, response_text="x")
    assert store.insert_generation(engine, row)
    assert store.sweep_and_row(engine, sweep.id, 3)[1] is True
    assert store.sweep_and_row(engine, sweep.id, 4)[1] is False

    store.stop_sweep(engine, sweep.id, "quota")
    head, _ = store.sweep_and_row(engine, sweep.id, 4)
    assert (head.state, head.stop_reason) == (SweepState.STOPPED, "quota")  # never a stale copy
    with pytest.raises(LookupError):
        store.sweep_and_row(engine, sweep.id + 1000, 0)


def test_the_worker_statements_run_without_transactions_or_pings(engine):
    """Autocommit and no pre-ping: only the two statements reach the database per request."""
    sweep, _ = store.create_or_resume_sweep(engine, "hot", parse_config(CONFIG))
    sent: list[str] = []
    listener = lambda conn, cursor, statement, *rest: sent.append(statement.split()[0].upper())  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        store.sweep_and_row(engine, sweep.id, 0)
        store.insert_generation(engine, dict(sweep_id=sweep.id, request_index=0, repeat=0, params={}, prompt="p",
                                             input_text="i", finished_at=utcnow(), state=RowState.OK))
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert sent == ["SELECT", "INSERT"]
    assert engine.pool._pre_ping is False


def test_kombu_keeps_one_sync_client_per_channel_pool(redis_db):
    queue = Queue("hot-test", Exchange("hot-test"), "hot-test")
    with Connection(redis_db) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key="hot-test", declare=[queue])
        message = channel.basic_get("hot-test", no_ack=False)
        message.ack()  # QoS.ack goes through the reused client
        channel._disconnect_pools()  # after a fork or a reconnect kombu builds a new pool ...
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool  # ... and a new client
            assert third.ping()


@pytest.mark.parametrize("wanted, level", [(False, logging.WARNING), (True, logging.NOTSET)])
def test_celery_per_task_lines_follow_the_setting(monkeypatch, wanted, level):
    quiet_task_lines(Settings(GRIDTUNE_TASK_LOG_LINES=wanted))
    try:
        assert logging.getLogger("celery.app.trace").level == level
        assert logging.getLogger("celery.worker.strategy").level == level
    finally:
        quiet_task_lines(Settings())
