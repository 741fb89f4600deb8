"""Secrets stay in the workers' environment: the API key is never in a broker message, a result,
a database row or a log file.

The key is recognisable (sk-SECRETCANARY + random hex) and given ONLY to the worker processes.
Task messages are captured exactly as the producer sent them (enqueued before any worker runs),
then Redis is dumped (type-aware, message bodies decoded) repeatedly while the workers run (retries
and fine-tune polls are published by the workers, which do hold the key) and once at the end.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys

import pytest
import redis
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

import localapi
from tests.acceptance.helpers import (
    sa_url,
    sweep_row,
)
from tests.support import clean_env, wait_for

pytestmark = pytest.mark.timeout(240)

CONFIG = """
repeats = 1
[dimensions]
n = {values}
[templates]
prompt = "Describe hero number {{n}} in two sentences."
input = "hero {{n}}"
[model]
max_output_tokens = 200
[dataset]
min_examples = 5
[finetune]
backend = "openai"
"""


def expand(value: bytes) -> list[bytes]:
    """A stored value plus what it hides: a kombu message's base64 body, JSON inside JSON."""
    found = [value]
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return found
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("properties", {}).get("body_encoding") == "base64" and isinstance(item.get("body"), str):
                body = base64.b64decode(item["body"])
                found.extend(expand(body))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and item[:1] in "[{":
            try:
                stack.append(json.loads(item))
            except ValueError:
                pass
    return found


def dump_redis(client: redis.Redis) -> dict[bytes, list[bytes]]:
    """Every key's content, by type, with message bodies decoded."""
    dump: dict[bytes, list[bytes]] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        else:
            values = [repr(client.dump(key)).encode()]
        dump[key] = [key] + [v for value in values for v in expand(value)]
    return dump


def occurrences(dump: dict[bytes, list[bytes]], needles: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [(key, needle) for key, values in dump.items() for value in values for needle in needles
            if needle in value]


def test_api_key_never_leaves_the_workers(redis_db, postgres_db, start_workers, tmp_path):
    key = "sk-SECRETCANARY" + secrets.token_hex(16)
    needles = [key.encode(), key[-12:].encode()]
    total = 60
    config = tmp_path / "secret.toml"
    config.write_text(CONFIG.format(values=json.dumps(list(range(total)))), encoding="utf-8")
    client = redis.Redis.from_url(redis_db)

    with localapi.running(api_keys=(key,), fault_rate=0.3, faults=("500", "malformed", "429")) as api:
        common = {
            "CELERY_BROKER_URL": redis_db,
            "DATABASE_URL": postgres_db,
            "OPENAI_BASE_URL": api.base_url,
            "GRIDTUNE_VISIBILITY_TIMEOUT": "20",
            "GRIDTUNE_MAX_INLINE_WAIT": "0.2",  # longer waits become retries: messages sent by workers
            "GRIDTUNE_BACKOFF_CAP": "2",
            "GRIDTUNE_MAX_ATTEMPTS": "1",  # a 500 or malformed reply fails its row: errors get stored
            "GRIDTUNE_FINETUNE_POLL_SECONDS": "0.5",
            "GRIDTUNE_DATA_DIR": str(tmp_path / "gridtune-data"),
        }
        # 1. The producer has no key; its messages are captured before any worker runs.
        producer_log = tmp_path / "producer.log"
        with open(producer_log, "w") as log:
            sent = subprocess.run([sys.executable, "-m", "producer", "-v", "sweep", "--config", str(config),
                                   "--name", "secret"], cwd=tmp_path, env=clean_env(**common),
                                  stdout=log, stderr=subprocess.STDOUT, timeout=60)
        assert sent.returncode == 0, producer_log.read_text()
        as_sent = dump_redis(client)
        messages = client.lrange("gridtune", 0, -1)
        assert len(messages) == total
        sweep_id = sweep_row(postgres_db, "secret").id
        indices = []
        for raw in messages:
            message = json.loads(raw)
            assert message["headers"]["task"] == "gridtune.generate"
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            assert len(args) == 2 and args[0] == sweep_id and not kwargs, (args, kwargs)  # (sweep_id, index) only
            indices.append(args[1])
        assert sorted(indices) == list(range(total))
        assert occurrences(as_sent, needles) == []

        # 2. Only the workers get the key (one of them logs at DEBUG).
        worker_env = {**common, "OPENAI_API_KEY": key}
        start_workers(1, worker_env, concurrency=10)
        start_workers(1, worker_env, concurrency=10, extra=("--loglevel", "DEBUG"))
        dumps = [as_sent]

        def finished():
            dumps.append(dump_redis(client))
            engine = create_engine(sa_url(postgres_db), poolclass=NullPool)
            try:
                with engine.connect() as conn:
                    state = conn.execute(text("SELECT state FROM sweeps WHERE name='secret'")).scalar()
            except OperationalError:  # PostgreSQL is shared: out of slots for a moment
                return False
            finally:
                engine.dispose()
            return state in ("done", "failed")

        wait_for(finished, 120, 0.3, "the sweep to finish")
        dumps.append(dump_redis(client))
        stats = api.stats()
    assert stats["accepted"] > 0 and stats["rejected"] == 0, stats  # the workers really used the key

    # 3. Nothing in Redis, at any point.
    assert any(k.startswith(b"celery-task-meta-") for d in dumps for k in d), "no result was ever stored"
    for dump in dumps:
        assert occurrences(dump, needles) == []

    # 4. Nothing in any table (every column of every row, as text).
    engine = create_engine(sa_url(postgres_db))
    with engine.connect() as conn:
        tables = inspect(conn).get_table_names()
        assert {"sweeps", "generations", "datasets", "finetune_jobs", "finetune_events"} <= set(tables)
        failed = conn.execute(text("SELECT count(*) FROM generations WHERE state='failed' AND error IS NOT NULL"))
        assert failed.scalar() > 0, "some requests should have failed with a stored error"
        for table in tables:
            rows = conn.execute(text(f'SELECT t::text FROM "{table}" t')).scalars().all()
            leaks = [row for row in rows for needle in needles if needle.decode() in row]
            assert leaks == [], f"{table}: {leaks[:2]}"
    engine.dispose()

    # 5. Nothing in the logs (workers, one at DEBUG, and the producer).
    logs = [producer_log, *sorted(tmp_path.glob("w*.log"))]
    assert len(logs) == 3
    for path in logs:
        content = path.read_bytes()
        assert content, path
        for needle in needles:
            assert needle not in content, f"{path.name} contains the key"
    # The datasets written by the finalizer do not carry it either.
    written = [path for path in (tmp_path / "gridtune-data").rglob("*") if path.is_file()]
    assert "train.jsonl" in {path.name for path in written}, written
    for path in written:
        assert all(needle not in path.read_bytes() for needle in needles), path
