"""Local fine-tune benchmark: TRL's SFTTrainer + LoRA on the packaged SmolLM2-135M-Instruct.

The tutorial's superhero grid (7 ages x 2 genders x 7 powers, one repeat: 98 examples) with the
descriptions the embedded default sweep stores (the local API server's text generator, 60-110
words), made into a dataset by the real finalizer in a throw-away SQLite database, then trained
through `local_backend.train` exactly as a `finetune` worker would: batch 8, 20 steps, LoRA r=8,
max_seq_length 256 (the config defaults otherwise). Runs on the GPU when there is one.

Reports seconds per step (median of the intervals between the job's step events, which are
stored as each step ends), examples/s and tokens/s (from the trainer's token count), the
validation loss before and after, and the process's peak RSS.

    python bench/local_finetune.py [--steps 20] [--batch 8] [--max-seq-length 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def superhero_config(steps: int, batch: int, max_seq_length: int):
    from gridtune.sweep import parse_config

    text = (Path(__file__).resolve().parent.parent / "sweeps" / "superhero.toml").read_text()
    config = parse_config(text)
    return config.model_copy(update={
        "repeats": 1,
        "finetune": config.finetune.model_copy(update={
            "backend": "local", "base_model": "smollm2-135m", "batch_size": batch, "max_steps": steps,
            "max_seq_length": max_seq_length, "seed": 0}),
    })


def build_sweep(ctx, config):
    """The sweep's rows as the embedded default would store them, finalized into a dataset."""
    from localapi.text import describe
    from models import RowState, store
    from worker.dataset import finalize_sweep

    sweep, _ = store.create_or_resume_sweep(ctx.engine, "bench-local-finetune", config)
    for index in range(config.total_requests):
        params, repeat = config.params(index)
        prompt, input_text = config.render(params)
        store.insert_generation(ctx.engine, {
            "sweep_id": sweep.id, "request_index": index, "repeat": repeat, "params": params,
            "prompt": prompt, "input_text": input_text, "state": RowState.OK, "finish_reason": "stop",
            "response_text": describe(prompt, random.Random(index)),
        })
    result = finalize_sweep(ctx, sweep.id)
    return sweep, result.dataset_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from gridtune.settings import Settings
    from models import store
    from worker import finetune
    from worker.context import WorkerContext

    tmp = Path(tempfile.mkdtemp(prefix="gridtune-bench-local-"))
    ctx = WorkerContext(Settings(DATABASE_URL=f"sqlite:///{tmp}/bench.db", GRIDTUNE_DATA_DIR=str(tmp / "data")))
    sweep, dataset_id = build_sweep(ctx, superhero_config(args.steps, args.batch, args.max_seq_length))
    dataset = store.get_dataset(ctx.engine, dataset_id)
    step = finetune.submit(ctx, sweep.id, dataset_id)
    started = time.monotonic()
    finetune.train_local(ctx, step.job_id, on_event=lambda message: print(message, file=sys.stderr, flush=True))
    wall = time.monotonic() - started
    job = store.get_job(ctx.engine, step.job_id)
    if job.status != "succeeded":
        raise SystemExit(f"bench: the job {job.status}: {job.error_message}")

    events = store.events_after(ctx.engine, job.id)
    step_times = [e.created_at for e in events if e.data and e.data.get("type") == "metrics" and "loss" in e.data]
    intervals = [(b - a).total_seconds() for a, b in zip(step_times, step_times[1:])]
    plan = next(e.data for e in events if e.data and e.data.get("type") == "plan")
    timing = next(e.data for e in events if e.data and e.data.get("type") == "timing")
    per_step = statistics.median(intervals)
    figures = {
        "device": plan["device"],
        "train_examples": dataset.train_examples,
        "validation_examples": dataset.validation_examples,
        "steps": timing["steps"],
        "batch_size": plan["batch_size"],
        "seconds_per_step_median": round(per_step, 3),
        "examples_per_second": round(plan["batch_size"] / per_step, 3),
        "train_seconds": timing["seconds"],
        "tokens_per_second": round(job.trained_tokens / timing["seconds"], 1),
        "trained_tokens": job.trained_tokens,
        "train_loss": job.train_loss,
        "validation_loss_before": job.validation_loss_before,
        "validation_loss_after": job.validation_loss_after,
        "train_local_wall_seconds": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
