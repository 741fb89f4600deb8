"""Flower against real workers: the API needs auth, shows the gridtune tasks with small id-only
arguments and never the API key; /metrics serves Prometheus text.

Real processes: `celery -A worker flower`, two `celery -A worker worker` processes, the producer
CLI, Redis, PostgreSQL and the local OpenAI-compatible server. Every wait polls with a deadline.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT, clean_env, wait_for

pytestmark = pytest.mark.timeout(240)

API_KEY = "sk-flowertest-0123456789abcdef"
AUTH = ("flower", "s3cret-pass")
# Args as Flower shows them: (sweep_id, index), small integers, then the sweep's name for people.
ID_ARGS = re.compile(r"^\(\d+, \d+\) sweep 'flower'$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, auth: tuple[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def sweep_config(path: Path) -> Path:
    path.write_text(
        """
name = "flower"
repeats = 2
[dimensions]
size = ["small", "large"]
colour = ["red", "green", "blue"]
[templates]
prompt = "Describe a {size} {colour} hero in one sentence."
input = "{size}, {colour}"
[model]
max_output_tokens = 200
[dataset]
min_examples = 5  # the local API answers a repeated prompt with the same text: 6 distinct examples
[finetune]
backend = "none"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def flower(redis_db, tmp_path):
    """`celery -A worker flower` on a free port with basic auth; yields its base URL."""
    port = free_port()
    log_path = tmp_path / "flower.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1",
             f"--basic-auth={AUTH[0]}:{AUTH[1]}"],
            cwd=ROOT, env=clean_env(CELERY_BROKER_URL=redis_db), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(f"{base}/healthcheck")[0] == 200 or process.poll() is not None, 60, 0.2,
                 "Flower to answer /healthcheck")
        assert process.poll() is None, log_path.read_text()
        yield base
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_flower_shows_workers_and_tasks_without_secrets(flower, redis_db, postgres_db, local_api, start_workers,
                                                        tmp_path):
    env = {"CELERY_BROKER_URL": redis_db, "DATABASE_URL": postgres_db, "OPENAI_API_KEY": API_KEY,
           "OPENAI_BASE_URL": local_api.base_url}
    workers = start_workers(2, env, prefix="fw", concurrency=4)
    names = {f"{w.name}@{socket.gethostname()}" for w in workers}

    # Flower sees both workers (and so listens to the broker) before any task is sent.
    def listed():
        status, body = get(f"{flower}/api/workers?refresh=1", AUTH, timeout=20)
        return status == 200 and names <= set(json.loads(body)) and body

    workers_body = wait_for(listed, 60, 0.5, f"Flower to list {names}")

    # The sweep, from a producer that has no API key.
    producer_env = clean_env(**{k: v for k, v in env.items() if k != "OPENAI_API_KEY"})
    result = subprocess.run(
        [sys.executable, "-m", "producer", "sweep", "--config", str(sweep_config(tmp_path / "flower.toml")),
         "--wait", "--timeout", "120"],
        cwd=tmp_path, env=producer_env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "12 requests enqueued" in result.stderr, result.stderr

    # Every request shows up in Flower as a succeeded gridtune.generate task (events arrive async).
    def generate_tasks():
        status, body = get(f"{flower}/api/tasks", AUTH)
        assert status == 200, (status, body[:500])
        tasks = {tid: t for tid, t in json.loads(body).items() if t.get("name") == "gridtune.generate"}
        done = [t for t in tasks.values() if t.get("state") == "SUCCESS"]
        return len(done) == 12 and (tasks, body)

    tasks, tasks_body = wait_for(generate_tasks, 60, 0.5, "Flower to show 12 succeeded gridtune.generate tasks")
    for task in tasks.values():
        assert ID_ARGS.match(task["args"]), task["args"]
        assert task["kwargs"] in ("{}", "", None), task["kwargs"]
        assert task["worker"] in names, task["worker"]
    assert {index for t in tasks.values() for index in [int(re.findall(r"\d+", t["args"])[1])]} == set(range(12))
    one = next(iter(tasks))
    status, info_body = get(f"{flower}/api/task/info/{one}", AUTH)
    assert status == 200 and json.loads(info_body)["name"] == "gridtune.generate", info_body[:500]

    _, workers_body = get(f"{flower}/api/workers?refresh=1", AUTH, timeout=20)
    for body in (workers_body, tasks_body, info_body):
        assert API_KEY not in body
        assert "sk-flowertest" not in body

    # Without credentials (or with wrong ones) the API answers 401.
    for path in ("/api/workers", "/api/tasks", f"/api/task/info/{one}"):
        assert get(f"{flower}{path}")[0] == 401, path
        assert get(f"{flower}{path}", ("flower", "wrong"))[0] == 401, path

    # /metrics: Prometheus text with Flower's metrics, counting our task events per worker.
    status, metrics = get(f"{flower}/metrics")
    assert status == 200
    assert "# TYPE flower_events_total counter" in metrics, metrics[:1000]
    succeeded = [line for line in metrics.splitlines()
                 if line.startswith("flower_events_total{") and 'task="gridtune.generate"' in line
                 and 'type="task-succeeded"' in line]
    assert succeeded, metrics[:2000]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in succeeded) == 12
    assert "flower_worker_online" in metrics
    assert API_KEY not in metrics
