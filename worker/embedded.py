"""Embedded mode: the whole Celery machinery inside one process, with no server to run.

The broker is kombu's `memory://` transport; the result backend is Celery's own Redis backend on an
in-process fakeredis server (chords count header results exactly as on a real Redis; the in-memory
cache backend rebuilds the group on every result and is unusable past a few hundred tasks). The
rate limiter shares the same fakeredis server. Tasks run on a real worker (thread pool) started
in this process: the same tasks and the same chord as a distributed run, not an eager shortcut.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import fakeredis
from celery.backends.redis import RedisBackend

from gridtune.errors import UserError
from gridtune.settings import get_settings, reset_settings

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
        # Also the `finetune` queue: embedded mode trains local adapters in-process too.
        queues=["gridtune", "finetune"],
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30,
    ) as worker:
        yield worker


_LOCAL_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GRIDTUNE_FINETUNE_POLL_SECONDS")


@contextmanager
def local_api_when_keyless(purpose: str = "running") -> Iterator[str | None]:
    """With no OPENAI_API_KEY (and no OPENAI_BASE_URL), serve this process from the local server.

    Says so loudly, points this process's settings at the server for the duration and restores
    them afterwards. Yields the server's URL, or None when a real key is set.
    """
    from worker.context import reset_context
    from worker.llm import LOCAL_PLACEHOLDER_KEY

    settings = get_settings()
    if settings.openai_api_key:
        yield None
        return
    if settings.openai_base_url:
        raise UserError(f"OPENAI_API_KEY is not set (needed for OPENAI_BASE_URL={settings.openai_base_url})")
    import localapi

    saved = {name: os.environ.get(name) for name in _LOCAL_ENV}
    with localapi.running(serve_unknown_tuned=True) as server:
        os.environ.update(OPENAI_API_KEY=LOCAL_PLACEHOLDER_KEY, OPENAI_BASE_URL=server.base_url)
        os.environ.setdefault("GRIDTUNE_FINETUNE_POLL_SECONDS", "0.5")  # its jobs take seconds
        reset_settings()
        reset_context()
        print(f"*** No OPENAI_API_KEY: {purpose} against gridtune's LOCAL OpenAI-compatible server at "
              f"{server.base_url}. Its answers and models are synthetic. Set OPENAI_API_KEY for real ones. ***",
              file=sys.stderr, flush=True)
        try:
            yield server.base_url
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            reset_settings()
            reset_context()
