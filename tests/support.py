"""Helpers the integration and acceptance tests share: waiting, worker processes, services."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("GRIDTUNE_TEST_REDIS", "redis://127.0.0.1:6379")
POSTGRES_URL = os.environ.get("GRIDTUNE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, message: str = "") -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: no stray gridtune/OpenAI settings from the parent."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GRIDTUNE_", "OPENAI_", "CELERY_", "DATABASE_URL"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


class WorkerProcess:
    """A real `celery -A worker worker` process with its log in a file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, concurrency: int = 20,
                 queues: str = "gridtune", pool: str = "threads", extra: tuple[str, ...] = ()):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO",
                   "--pool", pool, "--concurrency", str(concurrency), "-n", f"{name}@%h",
                   "-Q", queues, "--without-mingle", "--without-gossip", *extra]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        return " ready." in self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(10)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
