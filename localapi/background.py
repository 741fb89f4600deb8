"""Run the server on its own event loop in a background thread, for tests, benchmarks and embedded mode."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .config import ServerConfig
from .server import LocalAPIServer, client_host

START_TIMEOUT_SECONDS = 30.0  # the first start in a process also loads the vocabulary
STOP_TIMEOUT_SECONDS = 5.0
CALL_TIMEOUT_SECONDS = 5.0
T = TypeVar("T")


def wait_until_accepting(host: str, port: int, timeout: float) -> None:
    """Return once a TCP connect to host:port succeeds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout}s") from None
            time.sleep(0.01)


class ServerHandle:
    """A server running in a background thread. Thread-safe: every call runs on the server's loop."""

    def __init__(self, config: ServerConfig):
        self._config = config
        self._server: LocalAPIServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """Like http://127.0.0.1:PORT/v1, for `openai.OpenAI(base_url=...)`."""
        return self._running().base_url

    @property
    def config(self) -> ServerConfig:
        return self._running().config

    def start(self) -> ServerHandle:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(started),), name="localapi", daemon=True)
        self._thread.start()
        started.result(timeout=START_TIMEOUT_SECONDS)  # re-raises e.g. "address already in use"
        server = self._running()
        wait_until_accepting(client_host(server.config.host), server.config.port, START_TIMEOUT_SECONDS)
        return self

    async def _serve(self, started: concurrent.futures.Future[None]) -> None:
        server = LocalAPIServer(self._config)
        try:
            await server.start()
        except Exception as error:
            started.set_exception(error)
            await server.close()
            return
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        started.set_result(None)
        await self._stop_requested.wait()
        await server.close()

    def stop(self) -> None:
        """Stop serving and join the thread; calling it again does nothing."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop_requested is not None:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(STOP_TIMEOUT_SECONDS)
        self._thread = self._server = self._loop = self._stop_requested = None

    def stats(self) -> dict:
        return self._on_loop(lambda server: server.snapshot())

    def reset(self) -> None:
        """Clear the statistics and the rate-limit budgets."""
        self._on_loop(lambda server: server.reset())

    def update(self, **fields: Any) -> ServerConfig:
        """Change fault, latency, limit or fine-tuning settings live; ValueError for bad ones."""
        return self._on_loop(lambda server: server.update(**fields))

    def _running(self) -> LocalAPIServer:
        if self._server is None:
            raise RuntimeError("the local API server is not running")
        return self._server

    def _on_loop(self, call: Callable[[LocalAPIServer], T]) -> T:
        server = self._running()

        async def on_loop() -> T:
            return call(server)

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(CALL_TIMEOUT_SECONDS)

    def __enter__(self) -> ServerHandle:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def running(config: ServerConfig | None = None, **overrides: Any) -> Iterator[ServerHandle]:
    """Serve `config` (with `overrides` applied) in a background thread for the `with` block."""
    config = dataclasses.replace(config or ServerConfig(), **overrides)
    with ServerHandle(config) as handle:
        yield handle
