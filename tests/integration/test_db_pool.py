"""The Postgres pool under a worker's thread count: connections are kept, not reopened per burst."""

import threading

import pytest
from sqlalchemy import event, text

from models import get_engine

pytestmark = pytest.mark.integration

THREADS = 20  # as many as a worker process keeps connections (models/db.py); fixed, not read from the pool
BURSTS = 5


def test_concurrent_checkouts_reuse_connections(postgres_db):
    # Each new Postgres connection is a backend fork plus a connect: with overflow connections
    # (closed as soon as they are returned) every burst past the pool size paid it again.
    engine = get_engine(postgres_db)
    connects = []
    event.listen(engine, "connect", lambda *_: connects.append(1))
    everyone_holds_one = threading.Barrier(THREADS)
    errors = []

    def burst():
        try:
            for _ in range(BURSTS):
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                    everyone_holds_one.wait(timeout=30)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=burst) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    # The schema check may already hold one pooled connection; either way no burst reconnects.
    assert len(connects) <= THREADS, f"{len(connects)} connects for {BURSTS} bursts of {THREADS}"
