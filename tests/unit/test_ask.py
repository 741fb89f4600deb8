"""`python -m producer ask`: sampling the tuned model, and a clear error for every other case."""

from __future__ import annotations

import json
import sys

import httpx2
import openai
import pytest

import localapi
from gridtune.settings import get_settings, reset_settings
from models import JobStatus, store
from producer.cli import main
from tests.unit.test_finetune_helpers import make_sweep, run_until_done, sweep_config
from worker import finetune
from worker.context import WorkerContext
from worker.finetune.ask import sample

QUESTION = "18, man, can eat a lot"


@pytest.fixture
def server():
    with localapi.running(finetune_step_seconds=0.05) as handle:
        yield handle


@pytest.fixture
def ctx(monkeypatch, tmp_path, server) -> WorkerContext:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/gridtune.db")
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GRIDTUNE_FINETUNE_POLL_SECONDS", "0.05")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    reset_settings()
    return WorkerContext(get_settings())


def tuned_sweep(ctx, name="heroes", config=None):
    sweep, dataset_id = make_sweep(ctx, name, config)
    run_until_done(ctx, finetune.submit(ctx, sweep.id, dataset_id))
    job = store.latest_job(ctx.engine, sweep.id)
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    return sweep, job


class Recording(httpx2.BaseTransport):
    """Forwards to the real server and keeps every request body."""

    def __init__(self):
        self.real = httpx2.HTTPTransport()
        self.bodies: list[dict] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.bodies.append(json.loads(request.read() or b"{}"))
        return self.real.handle_request(request)


def test_ask_samples_the_tuned_model(ctx, capsys):
    tuned_sweep(ctx)
    assert main(["ask", "heroes", QUESTION]) == 0
    answer = capsys.readouterr().out.strip()
    # The local server's tuned models answer with this prefix; base models never do.
    assert answer.startswith("Fine-tuned profile: ")
    assert "eat a lot" in answer


def test_the_request_uses_the_config(ctx, server):
    config = sweep_config(finetune={"suffix": "hero"})
    sweep, job = tuned_sweep(ctx, config=config)
    recording = Recording()
    ctx.client = openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0,
                               http_client=httpx2.Client(transport=recording))
    assert sample(ctx, sweep, job, QUESTION)
    assert recording.bodies == [{
        "model": job.fine_tuned_model,
        "messages": [{"role": "system", "content": "You write superhero descriptions."},
                     {"role": "user", "content": QUESTION}],
        "temperature": 0.7,
        "max_completion_tokens": 256,
    }]


@pytest.mark.parametrize("system", [None, "You write superhero descriptions."])
def test_ask_sends_what_the_uploaded_file_trained_on_even_with_legacy_format(ctx, server, system):
    # legacy_format only adds an export (legacy.jsonl); the uploaded file is the chat train.jsonl,
    # so `ask` must send its turns exactly: no " ->" separator, no "END" stop word (issue 13, #6).
    config = sweep_config(dataset={"legacy_format": True}, system=system, model={"token_param": "max_tokens"})
    sweep, job = tuned_sweep(ctx, config=config)
    dataset = store.latest_dataset(ctx.engine, sweep.id)
    uploaded = [json.loads(line) for line in open(dataset.train_path, encoding="utf-8")]
    example = uploaded[0]["messages"]
    user_turn = next(m["content"] for m in example if m["role"] == "user")
    recording = Recording()
    ctx.client = openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0,
                               http_client=httpx2.Client(transport=recording))
    sample(ctx, sweep, job, user_turn)
    (body,) = recording.bodies
    assert body["messages"] == example[:-1] and example[-1]["role"] == "assistant"
    assert "stop" not in body and body["max_tokens"] == 256


def test_ask_errors_are_one_line(ctx, capsys):
    def ask_error(name: str) -> str:
        assert main(["ask", name, QUESTION]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gridtune: error: ")
        return err

    assert "no sweep named 'ghost'" in ask_error("ghost")

    sweep, dataset_id = make_sweep(ctx)
    assert f"sweep heroes has no fine-tune job yet (state {sweep.state})" in ask_error("heroes")

    job = store.create_job(ctx.engine, sweep.id, dataset_id, "openai", "gpt-4o-mini")
    store.set_status(ctx.engine, job.id, JobStatus.RUNNING)
    assert f"the fine-tune job {job.id} of sweep heroes is still running: status running" in ask_error("heroes")

    store.set_status(ctx.engine, job.id, JobStatus.FAILED, error_message="The job failed: bad data")
    assert f"the fine-tune job {job.id} of sweep heroes failed: The job failed: bad data" in ask_error("heroes")

    job = store.create_job(ctx.engine, sweep.id, dataset_id, "openai", "gpt-4o-mini")
    store.set_status(ctx.engine, job.id, JobStatus.UNAVAILABLE,
                     error_message="fine-tuning is not available to this organization: ...")
    assert "sweep heroes has no tuned model: fine-tuning is not available to this organization" in ask_error("heroes")

    job = store.create_job(ctx.engine, sweep.id, dataset_id, "none", "gpt-4o-mini")
    store.set_status(ctx.engine, job.id, JobStatus.SKIPPED)
    assert 'sweep heroes was not fine-tuned (backend = "none")' in ask_error("heroes")


def test_ask_reports_an_api_error(ctx, capsys):
    sweep, job = tuned_sweep(ctx)
    store.update_job(ctx.engine, job.id, fine_tuned_model="ft:gpt-4o-mini:gridtune:gone:123")
    assert main(["ask", "heroes", QUESTION]) == 2
    err = capsys.readouterr().err
    assert "asking ft:gpt-4o-mini:gridtune:gone:123: HTTP 404" in err and "sk-test" not in err


def test_ask_a_local_adapter_without_the_extra(ctx, capsys, monkeypatch):
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"backend": "local"}))
    job = store.create_job(ctx.engine, sweep.id, dataset_id, "local", "/models/tiny")
    store.set_status(ctx.engine, job.id, JobStatus.SUCCEEDED, fine_tuned_model="/data/heroes/adapter")
    # peft, not torch: hiding torch would make transformers remember "no torch" for later tests.
    monkeypatch.setitem(sys.modules, "peft", None)
    assert main(["ask", "heroes", QUESTION]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert 'local models need the `local` extra: pip install "gridtune[local]"; missing: peft' in err


def test_ask_a_local_adapter_that_is_gone(ctx, capsys, tmp_path):
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"backend": "local"}))
    job = store.create_job(ctx.engine, sweep.id, dataset_id, "local", "smollm2-135m")
    store.set_status(ctx.engine, job.id, JobStatus.SUCCEEDED, fine_tuned_model=str(tmp_path / "adapter"))
    assert main(["ask", "heroes", QUESTION]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"local model {tmp_path / 'adapter'}: no such folder" in err
