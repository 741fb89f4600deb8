"""Where a sweep stands: one snapshot (for `status` and `--json`) and a live view (`--wait`, `--watch`)."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
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
        end = counts.last_finished if sweep.state in FINAL_SWEEP_STATES else now
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


def describe(snap: dict[str, Any]) -> str:
    """A few human lines."""
    money = f"${snap['spent_usd']:.4f}" if snap["spent_usd"] is not None else "n/a (unknown model price)"
    if snap["max_cost_usd"] is not None:
        money += f" of a ${snap['max_cost_usd']:.4f} cap"
    left = f"{snap['seconds_left']:.0f}s" if snap["seconds_left"] is not None else "unknown"
    lines = [
        f"sweep {snap['name']}: {snap['state']}" + (f" ({snap['stop_reason']})" if snap["stop_reason"] else ""),
        f"  requests  {snap['done']}/{snap['total']} done: {snap['ok']} ok, {snap['failed']} failed, "
        f"{snap['remaining']} to go" + (f", {snap['in_flight']} in flight" if snap["in_flight"] is not None else ""),
        f"  tokens    {snap['prompt_tokens']:,} prompt + {snap['completion_tokens']:,} completion; "
        f"{snap['truncated']} truncated; {snap['rate_limited']} rate-limited (429) retries",
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
    return "\n".join(lines)


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
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(name, total=snap["total"], detail="")
        while True:
            detail = (
                f"ok {snap['ok']} failed {snap['failed']}"
                + (f" in flight {snap['in_flight']}" if snap["in_flight"] is not None else "")
                + f" | {snap['requests_per_minute'] or 0} req/min {snap['tokens_per_minute'] or 0} tok/min"
                + f" | 429s {snap['rate_limited']}"
                + (f" | ${snap['spent_usd']:.4f}" if snap["spent_usd"] is not None else "")
                + (f"/${snap['max_cost_usd']:.4f}" if snap["max_cost_usd"] is not None else "")
                + (f" | {snap['seconds_left']:.0f}s left" if snap["seconds_left"] else "")
                + f" | {snap['state']}"
            )
            bar.update(task, completed=snap["done"], detail=detail)
            if is_finished(snap) or (deadline is not None and time.monotonic() >= deadline):
                return snap
            time.sleep(interval)
            on_tick(snap)
            snap = snapshot(engine, name, in_flight())


def dump_json(snap: dict[str, Any]) -> None:
    print(json.dumps(snap, indent=2, default=str))
