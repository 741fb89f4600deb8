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


_LOCAL_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GRIDTUNE_FINETUNE_POLL_SECONDS", "GRIDTUNE_REQUEST_TIMEOUT",
              "GRIDTUNE_ADAPTIVE_IN_FLIGHT")
# A real model on a CPU answers a full batch in minutes, not seconds.
LOCAL_MODEL_REQUEST_TIMEOUT = "900"


@contextmanager
def local_api_when_keyless(purpose: str = "running", local_model: str | None = None) -> Iterator[str | None]:
    """Serve this process from gridtune's local server when there is no OPENAI_API_KEY, or always
    when the model is a local one (`local_model`: an alias like smollm2-135m, a folder, an adapter).

    Says so loudly, points this process's settings at the server for the duration and restores
    them afterwards. Yields the server's URL, or None when the real API is used.
    """
    from worker.context import reset_context
    from worker.llm import LOCAL_PLACEHOLDER_KEY

    settings = get_settings()
    if settings.openai_api_key and not local_model:
        yield None
        return
    if settings.openai_base_url and not local_model:
        raise UserError(f"OPENAI_API_KEY is not set (needed for OPENAI_BASE_URL={settings.openai_base_url})")
    import localapi

    saved = {name: os.environ.get(name) for name in _LOCAL_ENV}
    with localapi.running(serve_unknown_tuned=True, max_batch=settings.embedded_concurrency) as server:
        os.environ.update(OPENAI_API_KEY=LOCAL_PLACEHOLDER_KEY, OPENAI_BASE_URL=server.base_url)
        os.environ.setdefault("GRIDTUNE_FINETUNE_POLL_SECONDS", "0.5")  # its jobs take seconds
        if local_model:
            os.environ.setdefault("GRIDTUNE_REQUEST_TIMEOUT", LOCAL_MODEL_REQUEST_TIMEOUT)
            # The server admits exactly its batch (max_batch = the in-process worker's threads), so
            # no queue forms; a fuller batch makes each answer slower but the whole faster, which
            # the latency-based in-flight limit would read as a queue and cut.
            os.environ.setdefault("GRIDTUNE_ADAPTIVE_IN_FLIGHT", "false")
            print(f"*** {purpose} with the local model {local_model} on this machine, through gridtune's local "
                  f"OpenAI-compatible server at {server.base_url}. ***", file=sys.stderr, flush=True)
        else:
            print(f"*** No OPENAI_API_KEY: {purpose} against gridtune's LOCAL OpenAI-compatible server at "
                  f"{server.base_url}. Its answers and models are SIMULATED. Set OPENAI_API_KEY for real ones, "
                  f"or use a local model (model.name = \"smollm2-135m\"). ***", file=sys.stderr, flush=True)
        reset_settings()
        reset_context()
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
