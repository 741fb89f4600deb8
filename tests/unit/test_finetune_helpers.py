"""Builders the fine-tune and ask tests share (no tests here): a context on a temporary SQLite
database and data dir, and a sweep whose dataset the real finalizer built from stored rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gridtune.settings import Settings
from gridtune.sweep import SweepConfig
from models import FinetuneEvent, RowState, store
from worker.context import WorkerContext
from worker.dataset import finalize_sweep

DIMENSIONS = {
    "age": [18, 30, 40, 60],
    "gender": ["man", "woman"],
    "power": ["flight", "telepathy"],
}  # 16 requests -> about 14 training and 2 validation examples
DESCRIPTIONS = [
    "A quiet {age}-year-old {gender} who hides {power} behind a shy smile and a library card.",
    "Loud, brave and {age}: this {gender} uses {power} to get to work on time.",
]


def settings_for(tmp_path: Path, base_url: str | None = None, **overrides: Any) -> Settings:
    values = {
        "OPENAI_API_KEY": "sk-test",
        "DATABASE_URL": f"sqlite:///{tmp_path}/gridtune.db",
        "GRIDTUNE_DATA_DIR": str(tmp_path / "data"),
        "GRIDTUNE_FINETUNE_POLL_SECONDS": 0.05,
    }
    if base_url:
        values["OPENAI_BASE_URL"] = base_url
    values.update(overrides)
    return Settings(**values)


def make_context(tmp_path: Path, base_url: str | None = None, **overrides: Any) -> WorkerContext:
    return WorkerContext(settings_for(tmp_path, base_url, **overrides))


def sweep_config(finetune: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None,
                 system: str | None = "You write superhero descriptions.", **sections: Any) -> SweepConfig:
    """The test grid; `sections` adds others, e.g. ask={...} or model={...}."""
    return SweepConfig.model_validate({
        "dimensions": DIMENSIONS,
        "templates": {
            "prompt": "Describe a {age}-year-old {gender} with the superpower of {power}.",
            "input": "{age}, {gender}, {power}",
            "system": system,
        },
        "finetune": finetune or {},
        "dataset": dataset or {},
        **sections,
    })


def make_sweep(ctx: WorkerContext, name: str = "heroes", config: SweepConfig | None = None) -> tuple[Any, int]:
    """A sweep with one ok row per request, finalized into a dataset: (sweep, dataset_id)."""
    config = config or sweep_config()
    engine = ctx.engine
    sweep, _ = store.create_or_resume_sweep(engine, name, config)
    for index in range(config.total_requests):
        params, repeat = config.params(index)
        _, input_text = config.render(params)
        store.insert_generation(engine, {
            "sweep_id": sweep.id, "request_index": index, "repeat": repeat, "params": params,
            "prompt": "p", "input_text": input_text, "state": RowState.OK, "finish_reason": "stop",
            "response_text": DESCRIPTIONS[index % len(DESCRIPTIONS)].format(**params),
        })
    result = finalize_sweep(ctx, sweep.id)
    assert result.dataset_id is not None, result
    return store.get_sweep_by_id(engine, sweep.id), result.dataset_id


def run_until_done(ctx: WorkerContext, step, timeout: float = 20.0, on_step=None):
    """Follow steps as the Celery tasks would (without Celery), until there is nothing left to do."""
    from worker import finetune

    deadline = time.monotonic() + timeout
    steps = [step]
    while step.poll_in is not None:
        assert time.monotonic() < deadline, f"the job did not end within {timeout}s; steps: {steps}"
        time.sleep(step.poll_in)
        step = finetune.poll(ctx, step.job_id)
        steps.append(step)
        if on_step:
            on_step(step)
    return steps


def events(ctx: WorkerContext, job_id: int) -> list[FinetuneEvent]:
    from models import store

    return store.events_after(ctx.engine, job_id)
