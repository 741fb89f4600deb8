"""The local backend for real: LoRA on a tiny Llama built here (no downloads), on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import JobStatus, SweepState, store
from producer.cli import main
from tests.unit.test_finetune_helpers import make_sweep, sweep_config
from worker import finetune
from worker.context import WorkerContext

pytestmark = pytest.mark.local_finetune


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def ctx(monkeypatch, tmp_path) -> WorkerContext:
    from gridtune.settings import get_settings, reset_settings

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/gridtune.db")
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    return WorkerContext(get_settings())


def build_tiny_model(directory: Path, train_path: str) -> None:
    """A 2-layer Llama (hidden size 32) and a BPE tokenizer trained on the dataset's own text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with open(train_path) as lines:
        texts = ["".join(f"{m['role']}: {m['content']}\n" for m in json.loads(line)["messages"]) for line in lines]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    torch.manual_seed(0)
    # A wide initialisation lets the frozen output layer reach confident logits, so LoRA alone can
    # bring the loss down within a few steps.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def local_config(base_model: Path, **finetune):
    return sweep_config(
        finetune={"backend": "local", "base_model": str(base_model), "n_epochs": 10, "batch_size": 4,
                  "learning_rate": 0.01, "seed": 0, **finetune},
        dataset={"validation_fraction": 0.2},
        ask={"temperature": 0.0, "max_output_tokens": 24},
    )


def test_lora_training_lowers_the_loss_and_ask_uses_the_adapter(ctx, tmp_path, capsys):
    base_model = tmp_path / "tiny-llama"
    sweep, dataset_id = make_sweep(ctx, config=local_config(base_model))
    build_tiny_model(base_model, store.get_dataset(ctx.engine, dataset_id).train_path)

    step = finetune.submit(ctx, sweep.id, dataset_id)
    assert step.run_local and step.poll_in is None
    assert store.get_job(ctx.engine, step.job_id).status == JobStatus.QUEUED
    # `finetune` by hand continues the queued job: it trains here, showing progress.
    assert main(["finetune", sweep.name]) == 0
    out, err = capsys.readouterr()

    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    adapter = Path(job.fine_tuned_model)
    assert adapter == (tmp_path / "data" / sweep.name / "adapter").resolve()
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_model)
    assert job.trained_tokens > 0
    assert f"fine-tune job {job.id} succeeded: adapter {adapter}" in out
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE

    events = store.events_after(ctx.engine, job.id)
    metrics = [e.data for e in events if e.data and e.data.get("type") == "metrics" and "loss" in e.data]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1)) and len(metrics) >= 20
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"], [m["loss"] for m in metrics]
    assert any(e.data and "validation_loss" in e.data for e in events)
    assert f"job {job.id}: step {len(metrics)}/{len(metrics)}: loss" in err

    assert main(["ask", sweep.name, "18, man, can eat a lot"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_missing_base_model_fails_the_job_with_the_reason(ctx, tmp_path):
    sweep, dataset_id = make_sweep(ctx, config=local_config(tmp_path / "not-there"))
    step = finetune.submit(ctx, sweep.id, dataset_id)
    finetune.train_local(ctx, step.job_id)
    job = store.get_job(ctx.engine, step.job_id)
    assert job.status == JobStatus.FAILED
    assert job.error_message == f"FileNotFoundError: the base model directory {tmp_path / 'not-there'} does not exist"
    assert store.get_sweep_by_id(ctx.engine, sweep.id).state == SweepState.DONE


def test_a_job_is_trained_once(ctx, tmp_path):
    sweep, dataset_id = make_sweep(ctx, config=local_config(tmp_path / "not-there"))
    step = finetune.submit(ctx, sweep.id, dataset_id)
    finetune.train_local(ctx, step.job_id)
    before = len(store.events_after(ctx.engine, step.job_id))
    finetune.train_local(ctx, step.job_id)  # a redelivered task message finds the job finished
    assert len(store.events_after(ctx.engine, step.job_id)) == before
    assert store.get_job(ctx.engine, step.job_id).status == JobStatus.FAILED
