"""`eval` on the real packaged model (SmolLM2-135M-Instruct, CPU): a tiny held-out set, a 1-step
LoRA job, then base and adapter answer, SmolLM2 judges both orders, and the local trainer's own
loss code measures base and tuned on the held-out references per cell. Nothing is downloaded."""

from __future__ import annotations

import json

import pytest

from models import eval_store, store
from producer.cli import main
from tests.unit.test_finetune_helpers import make_sweep, sweep_config
from worker.context import WorkerContext

pytestmark = [pytest.mark.local_finetune, pytest.mark.timeout(900)]


@pytest.fixture
def ctx(monkeypatch, tmp_path) -> WorkerContext:
    from gridtune.settings import get_settings, reset_settings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/gridtune.db")
    monkeypatch.setenv("GRIDTUNE_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    return WorkerContext(get_settings())


def test_eval_of_a_local_adapter_on_the_packaged_model(ctx, capsys):
    # The helper's 16-request grid; age 18 (4 cells) never enters training, plus one free input.
    config = sweep_config(
        finetune={"backend": "local", "base_model": "smollm2-135m", "batch_size": 4, "max_steps": 1,
                  "learning_rate": 1e-3, "max_seq_length": 64, "seed": 0},
        dataset={"validation_fraction": 0.0, "min_examples": 2},
        model={"name": "smollm2-135m", "token_param": "max_tokens"},
        eval={"holdout_cells": {"age": [18]}, "inputs": ["30, man, can eat a lot"], "max_words": 30,
              "temperature": 0.0, "max_output_tokens": 24},
    )
    sweep, dataset_id = make_sweep(ctx, config=config)
    assert store.get_dataset(ctx.engine, dataset_id).dropped["heldout"] == 4
    assert main(["finetune", sweep.name]) == 0
    capsys.readouterr()

    assert main(["eval", sweep.name, "--json"]) == 0
    out, err = capsys.readouterr()
    assert "with the local model" in err
    summary = json.loads(out)
    assert summary["state"] == "done" and summary["inputs"] == 5
    assert summary["base_model"] == "smollm2-135m" and summary["judge_model"] == "smollm2-135m"
    assert summary["tuned_model"].endswith("/adapter")
    overall = summary["overall"]
    # SmolLM2-135M is a poor judge: whatever it says is either read or recorded as unreadable.
    assert overall["wins"] + overall["ties"] + overall["losses"] + overall["invalid_verdicts"] == 5
    loss = overall["validation_loss"]
    assert loss["base"] > 0 and loss["tuned"] > 0
    held = [c for c in summary["cells"] if c["source"] == "heldout_cell"]
    assert len(held) == 4 and all(c["validation_loss"]["base"] > 0 for c in held)
    free = [c for c in summary["cells"] if c["source"] == "free_input"]
    assert free[0]["cell"] == {"age": 30, "gender": "man", "power": "can eat a lot"} and free[0]["validation_loss"] is None
    assert all(s["base"] and s["tuned"] for s in summary["samples"])  # real answers from both models

    run = eval_store.latest_run(ctx.engine, sweep.id)
    verdicts = eval_store.judgements(ctx.engine, run.id)
    assert len(verdicts) == 10 and all(v.prompt and v.verdict_text is not None for v in verdicts)
    assert run.finalizer_runs == 1
