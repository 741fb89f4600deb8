"""Where a sweep stands: one snapshot (for `status` and `--json`) and a live view (`--wait`, `--watch`)."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from datetime import datetime, timezone
from typing import Any, Callable

from rich.console import Console
from rich.live import Live
from rich.text import Text
from sqlalchemy import Engine

from gridtune import pricing
from models import SweepState, store

FINAL_SWEEP_STATES = {SweepState.DONE, SweepState.FAILED}


def snapshot(engine: Engine, name: str, in_flight: int | None = None) -> dict[str, Any]:
    """Everything `status` shows, as plain data."""
    sweep = store.get_sweep(engine, name)
    counts = store.sweep_counts(engine, sweep)
    config = store.sweep_config(sweep)
    now = datetime.now(timezone.utc)
    elapsed = None
    rate = None
    if counts.first_finished and counts.done:
        start = sweep.enqueued_at or counts.first_finished
        # Once every request has its row the request phase is over: the pace stays what it was
        # (it must not decay while the fine-tune runs).
        end = counts.last_finished if sweep.state in FINAL_SWEEP_STATES or not counts.missing else now
        elapsed = max((_aware(end) - _aware(start)).total_seconds(), 1e-3)
        rate = counts.done / elapsed
    minutes = elapsed / 60 if elapsed else None
    job = store.latest_job(engine, sweep.id)
    return {
        "name": sweep.name,
        "state": sweep.state,
        "stop_reason": sweep.stop_reason,
        "total": counts.total,
        "ok": counts.ok,
        "failed": counts.failed,
        "done": counts.done,
        "remaining": counts.missing,
        "in_flight": in_flight,
        "truncated": counts.truncated,
        "incomplete": counts.incomplete,
        "rate_limited": counts.rate_limited,
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "requests_per_minute": round(counts.done / minutes, 1) if minutes else None,
        "tokens_per_minute": round((counts.prompt_tokens + counts.completion_tokens) / minutes) if minutes else None,
        "mode": sweep.mode or "online",
        "batches": store.batch_states(engine, sweep.id) if sweep.mode == "batch" else None,
        "spent_usd": spent_usd(counts, config.model.name),
        "max_cost_usd": sweep.max_cost_usd,
        "seconds_left": round(counts.missing / rate, 1) if rate and counts.missing else (0 if not counts.missing else None),
        "errors": counts.errors,
        "finalizer_runs": sweep.finalizer_runs,
        # Wall time since the sweep was (last) enqueued, through the fine-tune step.
        "elapsed_seconds": round(((_aware(sweep.finished_at) if sweep.finished_at and sweep.state in FINAL_SWEEP_STATES
                                   else now) - _aware(sweep.enqueued_at)).total_seconds(), 1)
        if sweep.enqueued_at else None,
        "finetune": None if job is None else {
            "backend": job.backend,
            "status": job.status,
            "job_id": job.provider_job_id,
            "fine_tuned_model": job.fine_tuned_model,
            "error": job.error_message,
        },
    }


def spent_usd(counts: store.SweepCounts, model: str) -> float | None:
    """What the sweep's rows cost: their stored costs, plus rows stored without one (older
    gridtune versions) priced now; None when such rows exist and the model has no price."""
    if not (counts.unpriced_prompt_tokens or counts.unpriced_completion_tokens):
        return counts.cost_usd
    rest = pricing.inference_cost(model, counts.unpriced_prompt_tokens, counts.unpriced_completion_tokens)
    return None if rest is None else counts.cost_usd + rest


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def is_finished(snap: dict[str, Any]) -> bool:
    return snap["state"] in FINAL_SWEEP_STATES


def wrap(lines: list[str], width: int | None = None) -> str:
    """Lines fitted to the terminal: long ones continue under their text, never split mid-word.

    Without `width`: the terminal's; output that is not a terminal (a pipe, a log) is not wrapped.
    """
    if width is None:
        if not sys.stdout.isatty():
            return "\n".join(lines)
        width = shutil.get_terminal_size((100, 24)).columns
    out = []
    for line in lines:
        # "  label     text": continuation lines start under the text (column 12)
        indent = " " * (12 if line.startswith("  ") else 2)
        out.append(textwrap.fill(line, width=max(width - 1, 40), subsequent_indent=indent,
                                 break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def describe(snap: dict[str, Any], width: int | None = None) -> str:
    """A few human lines, wrapped at `width` (default: the terminal's)."""
    money = f"${snap['spent_usd']:.4f}" if snap["spent_usd"] is not None else "n/a (unknown model price)"
    if snap["max_cost_usd"] is not None:
        money += f" of a ${snap['max_cost_usd']:.4f} cap"
    left = f"{snap['seconds_left']:.0f}s" if snap["seconds_left"] is not None else "unknown"
    lines = [
        f"sweep {snap['name']}: {snap['state']}" + (f" ({snap['stop_reason']})" if snap["stop_reason"] else ""),
        f"  requests  {snap['done']}/{snap['total']} done: {snap['ok']} ok, {snap['failed']} failed, "
        f"{snap['remaining']} to go" + (f", {snap['in_flight']} in flight" if snap["in_flight"] is not None else ""),
        f"  tokens    {snap['prompt_tokens']:,} prompt + {snap['completion_tokens']:,} completion; "
        f"{snap['truncated']} truncated"
        + (f", {snap['incomplete'] - snap['truncated']} otherwise incomplete (kept out of the dataset)"
           if snap.get("incomplete", 0) > snap["truncated"] else "")
        + f"; {snap['rate_limited']} rate-limited (429) retries",
        f"  pace      {snap['requests_per_minute'] or 0} requests/min, {snap['tokens_per_minute'] or 0} tokens/min; "
        f"spent {money}; time left {left}",
    ]
    if snap["batches"]:
        lines.append("  batches   " + ", ".join(f"{n} {state}" for state, n in sorted(snap["batches"].items())))
    if snap["errors"]:
        lines.append("  failures  " + ", ".join(f"{kind or 'other'}: {n}" for kind, n in snap["errors"].items()))
    if job := snap["finetune"]:
        model = f" -> {job['fine_tuned_model']}" if job["fine_tuned_model"] else ""
        error = f": {job['error']}" if job["error"] else ""
        lines.append(f"  fine-tune {job['backend']} {job['status']}{model}{error}")
    return wrap(lines, width)


def follow(
    engine: Engine,
    name: str,
    *,
    interval: float = 1.0,
    timeout: float | None = None,
    as_json: bool = False,
    in_flight: Callable[[], int | None] = lambda: None,
    on_tick: Callable[[dict[str, Any]], None] = lambda snap: None,
) -> dict[str, Any]:
    """Draw progress until the sweep reaches a final state (or `timeout`); returns the last snapshot.

    `on_tick` sees every snapshot (the stall watchdog hangs there).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    console = Console(stderr=True)
    snap = snapshot(engine, name, in_flight())
    if as_json or not console.is_terminal:
        # Scripts and logs: one line per change, never silent for long.
        last = None
        while not is_finished(snap) and (deadline is None or time.monotonic() < deadline):
            line = f"{snap['state']}: {snap['done']}/{snap['total']} done ({snap['failed']} failed)"
            if line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            time.sleep(interval)
            on_tick(snap)
            snap = snapshot(engine, name, in_flight())
        return snap
    def line() -> Text:
        return Text(progress_line(snap, console.width), no_wrap=True, overflow="ellipsis")

    with Live(line(), console=console, auto_refresh=False, transient=False) as live:
        while True:
            live.update(line(), refresh=True)
            if is_finished(snap) or (deadline is not None and time.monotonic() >= deadline):
                return snap
            time.sleep(interval)
            on_tick(snap)
            snap = snapshot(engine, name, in_flight())


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


BAR_MIN, BAR_GOOD, BAR_MAX = 10, 20, 40


def progress_line(snap: dict[str, Any], width: int) -> str:
    """The live line, fitted to `width` columns: name, bar, count, state, time left and elapsed
    always (the name shortened if it must be); then failed, in flight, pace, 429s and cost as room
    allows. The bar takes what is left (10 to 40 cells; none below 10)."""
    done, total = snap["done"], snap["total"]
    name = snap["name"]
    left = snap["seconds_left"]
    essentials = [f"{done:,}/{total:,}", snap["state"]]
    if left and snap["remaining"]:
        essentials.append(f"{_duration(left)} left")
    essentials.append(f"elapsed {_duration(snap.get('elapsed_seconds'))}")
    extras = []
    if snap["failed"]:
        extras.append(f"{snap['failed']:,} failed")
    if snap["in_flight"]:
        extras.append(f"{snap['in_flight']:,} in flight")
    if snap["requests_per_minute"]:
        extras.append(f"{snap['requests_per_minute']:,.0f} req/min")
    if snap["tokens_per_minute"]:
        extras.append(f"{snap['tokens_per_minute']:,} tok/min")
    if snap["rate_limited"]:
        extras.append(f"429s {snap['rate_limited']:,}")
    if snap["spent_usd"] is not None:
        extras.append(f"${snap['spent_usd']:.4f}" + (f"/${snap['max_cost_usd']:.4f}" if snap["max_cost_usd"] is not None else ""))
    width = max(width - 1, 20)  # the last column would wrap on some terminals
    core = " ".join(essentials)
    if len(name) + 1 + BAR_MIN + 1 + len(core) > width:  # shorten a long name before losing the bar
        keep = max(width - len(core) - BAR_MIN - 3, 12)
        if keep < len(name):
            name = name[:keep] + "\u2026"
    fixed = len(name) + 1 + len(core)
    shown = []
    for extra in extras:  # extras only while the bar keeps a readable width
        if fixed + 1 + BAR_GOOD + len(" | " + " ".join(shown + [extra])) <= width:
            shown.append(extra)
    tail = core + (" | " + " ".join(shown) if shown else "")
    bar_room = width - len(name) - len(tail) - 2
    if bar_room < BAR_MIN:
        return f"{name} {tail}"[:width]
    cells = min(BAR_MAX, bar_room)
    filled = int(cells * done / total) if total else cells
    bar = "━" * filled + "─" * (cells - filled)
    return f"{name} {bar} {tail}"


def dump_json(snap: dict[str, Any]) -> None:
    print(json.dumps(snap, indent=2, default=str))
