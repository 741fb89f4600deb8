"""Fixtures: real services for integration tests (a missing service FAILS, never skips)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.support import POSTGRES_URL, REDIS_URL, WorkerProcess, clean_env, wait_for

# Read once, at import: the autouse fixture below removes every GRIDTUNE_* variable before a test
# runs, and concurrent test runs on one machine rely on this one to keep out of each other's way.
TEST_REDIS_DB = os.environ.get("GRIDTUNE_TEST_REDIS_DB")


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch, tmp_path):
    """Each test starts from an environment without gridtune settings, in its own directory."""
    from gridtune.settings import reset_settings

    for key in list(os.environ):
        if key.startswith(("GRIDTUNE_", "OPENAI_", "CELERY_")) or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    reset_settings()
    yield
    reset_settings()


@pytest.fixture(scope="session")
def redis_server() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} for integration tests: {exc}")
    return REDIS_URL


@pytest.fixture
def redis_db(redis_server) -> str:
    """A flushed Redis database of its own (1..14) for one test."""
    # GRIDTUNE_TEST_REDIS_DB lets concurrent test runs on one machine keep out of each other's way.
    db = int(TEST_REDIS_DB or
             int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 14 + 1)
    url = f"{redis_server}/{db}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    engine = create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is required at {POSTGRES_URL} for integration tests: {exc}")
    finally:
        engine.dispose()
    return POSTGRES_URL


@pytest.fixture
def postgres_db(postgres_server) -> str:
    """A fresh database for one test, dropped afterwards."""
    name = f"gridtune_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_server.replace("postgresql://", "postgresql+psycopg://"),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    yield url
    from models import dispose_engines

    dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def local_api():
    import localapi

    with localapi.running() as server:
        yield server


@pytest.fixture
def start_workers(tmp_path):
    """start_workers(n, env, **kw) -> [WorkerProcess]; every worker is stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(count: int, env: dict[str, str], prefix: str = "w", wait: bool = True, **kwargs) -> list[WorkerProcess]:
        batch = [WorkerProcess(f"{prefix}{len(started) + i}", clean_env(**env), tmp_path, **kwargs)
                 for i in range(count)]
        started.extend(batch)
        if wait:
            for worker in batch:
                wait_for(lambda w=worker: w.ready() or not w.alive(), 60, 0.2, f"{worker.name} to start")
                assert worker.alive(), worker.output()
        return batch

    yield start
    for worker in started:
        worker.stop()


def pytest_collection_modifyitems(items):
    # Directory decides the marker: tests/integration -> integration, tests/acceptance -> acceptance.
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "acceptance" in parts:
            item.add_marker(pytest.mark.acceptance)
