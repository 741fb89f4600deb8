"""Embedded mode: the whole Celery machinery inside one process, with no server to run.

The broker is kombu's `memory://` transport; the result backend is Celery's own Redis backend on an
in-process fakeredis server (chords count header results exactly as on a real Redis; the in-memory
cache backend rebuilds the group on every result and is unusable past a few hundred tasks). The
rate limiter shares the same fakeredis server. Tasks run on a real worker (thread pool) started
in this process: the same tasks and the same chord as a distributed run, not an eager shortcut.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import fakeredis
from celery.backends.redis import RedisBackend

log = logging.getLogger(__name__)

_SERVER = fakeredis.FakeServer()


def in_process_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=_SERVER)


class InProcessRedisBackend(RedisBackend):
    """Celery's Redis result backend on the process's fakeredis server."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("url", None)
        super().__init__(*args, **kwargs)

    def _create_client(self, **params):
        return in_process_redis()


@contextmanager
def in_process_worker(app, concurrency: int) -> Iterator[object]:
    """A real Celery worker on a thread pool inside this process, stopped on exit."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app,
        concurrency=concurrency,
        pool="threads",
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as worker:
        yield worker
