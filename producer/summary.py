"""What a user needs after `sweep`: where the rows and the dataset are, what the counts mean, what next.

Kept apart from the live progress (producer/progress.py) and the CLI plumbing (producer/cli.py).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from sqlalchemy import Engine

from models import JobStatus, SweepState, store
from models.db import describe_database
from worker.dataset import likely_causes
from worker.dataset_report import digest
from worker.finetune.ask import example_input


def after_sweep(engine: Engine, name: str, asked: bool = False) -> list[str]:
    """Lines (no trailing newline) naming the database, the dataset files, notes and the next command.

    asked: the tuned model's answer is shown next to these lines (with its own `ask` command).
    """
    sweep = store.get_sweep(engine, name)
    config = store.sweep_config(sweep)
    quoted = shlex.quote(name)
    lines = [f"  database  {describe_database(engine)}"]
    dataset = store.latest_dataset(engine, sweep.id)
    if dataset is not None:
        lines.append(f"  training  {dataset.train_path} ({dataset.train_examples:,} examples)")
        if dataset.validation_path:
            lines.append(f"  validate  {dataset.validation_path} ({dataset.validation_examples:,} examples)")
        if dataset.legacy_path:
            lines.append(f"  legacy    {dataset.legacy_path} (prompt/completion export; not what is trained on)")
        dropped = ", ".join(f"{n:,} {why}" for why, n in dataset.dropped.items() if n)
        if dropped:
            lines.append(f"  left out  {dropped}")
        kept = dataset.train_examples + dataset.validation_examples
        for cause in likely_causes(dataset.dropped, dataset.inputs, dataset.identical_inputs, kept):
            lines.append(f"  note      {cause}")
        if dataset.report is not None:
            lines.append(f"  report    {Path(dataset.train_path).with_name('report.json')} (per cell: coverage, "
                         "drops, lengths, tokens, cost)")
            if note := digest(dataset.report):
                lines.append(f"  note      {note}")
    job = store.latest_job(engine, sweep.id)
    if job is not None and job.status == JobStatus.SUCCEEDED:
        if not asked:
            lines.append(f"  next      python -m producer ask {quoted} {shlex.quote(example_input(config))}")
        lines.append(f"  did it help?  python -m producer eval {quoted}   (tuned vs base per grid cell, HTML report)")
    elif job is not None and job.status == JobStatus.UNAVAILABLE:
        # Expected, not a fault: the provider no longer fine-tunes for this organization.
        lines.append(f"  next      python -m producer export {quoted} --training-set train.jsonl   "
                     '(or train here: [finetune] backend = "local")')
    elif job is not None and job.status in JobStatus.FINAL and job.status != JobStatus.SKIPPED:
        lines.append(f"  next      fix the cause above, then: python -m producer finetune {quoted}")
    elif job is not None and job.status not in JobStatus.FINAL:
        lines.append("  next      python -m producer jobs   (the fine-tune is still running)")
    elif sweep.state == SweepState.FAILED:
        lines.append("  next      fix the cause above, then run the same `python -m producer sweep` again")
    elif sweep.state == SweepState.STOPPED:
        lines.append("  next      fix the cause above, then run the same `python -m producer sweep` again to resume")
    elif dataset is not None:
        lines.append(f"  next      python -m producer export {quoted} --training-set train.jsonl")
    return lines
