"""What an operator sees (issue 13, #13): the live line at 80 and 120 columns, a summary that wraps
between words, a pace that does not decay during the fine-tune, and Flower args that name the sweep."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.text import Text

from producer.progress import describe, progress_line

SNAP = {
    "name": "superhero", "state": "running", "stop_reason": None, "total": 294, "ok": 116, "failed": 3,
    "done": 119, "remaining": 175, "in_flight": 32, "truncated": 0, "rate_limited": 4,
    "prompt_tokens": 12_000, "completion_tokens": 40_000, "requests_per_minute": 610.3,
    "tokens_per_minute": 16_479, "spent_usd": 0.0123, "max_cost_usd": None, "batches": {}, "mode": "online", "seconds_left": 172.0, "errors": {"server_error": 3},
    "finalizer_runs": 0, "elapsed_seconds": 75.2,
    "finetune": {"backend": "openai", "status": "failed", "job_id": None, "fine_tuned_model": None,
                 "error": "not submitted: the training file has 5 examples, fewer than 10 (the openai backend's "
                          "minimum): /home/someone/projects/gridtune-data/superhero/train.jsonl"},
}


def rendered(line: str, width: int) -> str:
    """The line as a terminal of `width` columns shows it (rich, as `--wait` draws it)."""
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=True, color_system=None).print(
        Text(line, no_wrap=True, overflow="ellipsis"))
    return out.getvalue().rstrip("\n")


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("name", ["superhero", "heroes-v2-with-a-rather-long-descriptive-name"])
def test_the_live_line_keeps_what_matters_at_80_and_120_columns(width, name):
    shown = rendered(progress_line({**SNAP, "name": name}, width), width)
    assert "\n" not in shown and len(shown) < width
    assert shown.startswith(name[:12])
    assert "119/294" in shown and "running" in shown and "2m52s left" in shown and "elapsed 1m15s" in shown
    bar = re.search("[\u2501\u2500]+", shown)
    assert bar and len(bar.group()) >= 10
    if width == 120 and name == "superhero":
        assert len(bar.group()) >= 20 and "3 failed" in shown and "req/min" in shown


def test_the_summary_wraps_between_words_at_80_columns():
    text = describe(SNAP, 80)
    words = " ".join(describe(SNAP, 1000).split()).split(" ")
    assert all(len(line) <= 80 for line in text.splitlines())
    assert " ".join(text.split()).split(" ") == words  # the same words, none split
    assert "/home/someone/projects/gridtune-data/superhero/train.jsonl" in text.split()


def test_the_pace_stays_when_every_request_is_done(tmp_path):
    from gridtune.settings import Settings
    from models import SweepState, store
    from producer.progress import snapshot
    from tests.unit.test_finetune_helpers import make_sweep
    from worker.context import WorkerContext

    ctx = WorkerContext(Settings(DATABASE_URL=f"sqlite:///{tmp_path}/p.db", GRIDTUNE_DATA_DIR=str(tmp_path / "d")))
    sweep, _ = make_sweep(ctx, "pace")
    store.mark_enqueued(ctx.engine, sweep.id)
    store.set_sweep_state(ctx.engine, sweep.id, SweepState.FINETUNING)
    first = snapshot(ctx.engine, "pace")
    counts = store.sweep_counts(ctx.engine, store.get_sweep(ctx.engine, "pace"))
    start = store.get_sweep(ctx.engine, "pace").enqueued_at
    # The pace is measured up to the last row (the request phase), not up to now.
    seconds = max((counts.last_finished.replace(tzinfo=None) - start.replace(tzinfo=None)).total_seconds(), 1e-3)
    assert first["requests_per_minute"] == round(counts.done / (seconds / 60), 1)
    assert first["elapsed_seconds"] is not None and first["elapsed_seconds"] >= 0


def test_flower_shows_which_sweep_a_task_belongs_to():
    from producer.enqueue import send_chord
    from worker.app import app  # embedded defaults: memory broker, in-process Redis backend

    send_chord(app, 7, [39, 40], 2, sweep_name="heroes-v2")
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(app.conf.task_default_queue)
        labels = []
        for _ in range(2):
            message = queue.get(timeout=5)
            labels.append((message.headers["argsrepr"], message.decode()[0] if isinstance(message.decode(), list)
                           else None))
            message.ack()
        queue.close()
    assert [label for label, _ in labels] == ["(7, 39) sweep 'heroes-v2'", "(7, 40) sweep 'heroes-v2'"]
    assert [args for _, args in labels] == [[7, 39], [7, 40]]  # the arguments are still ids only
