"""The README's first command, timed: `python -m producer sweep` with no key, in a fresh folder.

    python bench/first_command.py [--keep DIR] [--json out.json]

Runs the keyless default (the packaged SmolLM2 generates the tutorial's 294 requests, a LoRA
adapter is trained on them, the tuned model answers "18, man, can eat a lot") exactly as a user
would, and splits the wall time with the timestamps gridtune stored: generation (sweep created ->
last row), finalizer, training (job created -> finished) and the closing sample. The model
conversion cache is the user's (`~/.cache/gridtune/models`): run once before timing if it is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _seconds(later: str, earlier: str) -> float:
    return round((datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds(), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="run in this folder (kept) instead of a temporary one")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="gridtune-first-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GRIDTUNE_", "OPENAI_", "CELERY_", "DATABASE_URL"))}
    if os.environ.get("GRIDTUNE_MODEL_CACHE"):
        env["GRIDTUNE_MODEL_CACHE"] = os.environ["GRIDTUNE_MODEL_CACHE"]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "producer", "sweep"], cwd=folder, env=env, capture_output=True,
                          text=True)
    wall = time.monotonic() - started
    (folder / "stdout.txt").write_text(done.stdout)
    (folder / "stderr.txt").write_text(done.stderr)
    if done.returncode != 0:
        sys.exit(f"exit {done.returncode}: {done.stderr[-2000:]}")
    db = sqlite3.connect(folder / "gridtune.db")
    created, = db.execute("SELECT created_at FROM sweeps WHERE name = 'superhero'").fetchone()
    first_row, last_row, rows, ok, tokens, cut = db.execute(
        "SELECT min(started_at), max(finished_at), count(*), sum(state = 'ok'), sum(completion_tokens), "
        "sum(finish_reason = 'length') FROM generations").fetchone()
    job = db.execute("SELECT created_at, finished_at, status, train_loss, validation_loss_before, "
                     "validation_loss_after, fine_tuned_model FROM finetune_jobs ORDER BY id DESC").fetchone()
    dataset = db.execute("SELECT * FROM datasets ORDER BY id DESC").fetchone()
    figures = {
        "wall_s": round(wall, 1),
        "generation_s": _seconds(last_row, created),
        "rows": rows, "ok": ok, "completion_tokens": tokens, "truncated": cut,
        "generation_tokens_per_s": round(tokens / _seconds(last_row, first_row), 1),
        "finalizer_to_job_s": _seconds(job[0], last_row),
        "training_s": _seconds(job[1], job[0]) if job[1] else None,
        "job_status": job[2], "train_loss": job[3], "validation_loss_before": job[4], "validation_loss_after": job[5],
        "dataset_row": list(dataset) if dataset else None,
        "summary": done.stdout.strip().splitlines()[-6:],
        "folder": str(folder),
    }
    print(json.dumps(figures, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
