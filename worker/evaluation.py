"""`python -m producer eval NAME`: did the fine-tune help, and for which cells of the grid?

For every held-out input ([eval] in the sweep config: held-out rows' inputs and free inputs) the
base and the tuned model answer with the same settings, in the training format
(`worker.dataset.prompt_messages`); then a judge compares each pair twice with the positions
swapped. Like a sweep it runs as tasks: an answers chord whose body enqueues the judge chord,
whose body is the eval finalizer. One call per task, through the sweep's shared rate budget and
spend budget, classified and retried by `worker.llm`'s rules; one row per (item, side) and per
(item, position), so re-running `eval` sends only what is missing.

Pure parts (tested without Celery): `build_items`, `judge_messages`, `parse_verdict`,
`pair_outcome`, `checks`, `summarize`. `eval_summary(engine, sweep_name)` is the data the HTML
report renders (producer/report.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from gridtune import pricing
from gridtune.errors import UserError
from gridtune.sweep import EvalSettings, SweepConfig, heldout_source, parse_input
from models import RowState, SweepState, store
from models import eval_store
from models.schema import EvalRun, EvalState, Sweep, utcnow
from worker import llm
from worker.dataset import incomplete_reason, prompt_messages
from worker.generation import _bookkeeping, read_completion, send_once
from worker.spend import RequestSpend, budget_key as spend_budget_key
from worker.tokens import count_messages, encoding_name

log = logging.getLogger(__name__)

SIDES = ("base", "tuned")
POSITIONS = ("base_first", "tuned_first")
FREE_INPUT = "free_input"
JUDGE_MAX_OUTPUT_TOKENS = 16  # "A", "B" or "tie", with room for a little chatter
JUDGE_SEED = 0


def eval_settings(config: SweepConfig) -> EvalSettings:
    return config.eval or EvalSettings()


# --- what is asked -------------------------------------------------------------------------------
def build_items(config: SweepConfig, rows: Iterable[Any]) -> list[dict[str, Any]]:
    """The eval items, in a fixed order: one per distinct held-out input (request order), then the
    free inputs. rows: the sweep's stored rows (params, repeat, input_text, state, finish_reason,
    response_text). Each item: {"input", "cell" (dimension -> value, or {"input": text} for a free
    input that does not parse), "source" ("heldout_repeat" | "heldout_cell" | "free_input"),
    "references" (the held-out rows' whole ok answers: validation-loss targets)}.
    """
    items: dict[str, dict[str, Any]] = {}
    for row in rows:
        source = heldout_source(config, row.params, row.repeat)
        if source is None:
            continue
        item = items.setdefault(row.input_text, {"input": row.input_text, "cell": dict(row.params),
                                                 "source": source, "references": []})
        if row.state == RowState.OK and row.response_text and not incomplete_reason(row.finish_reason):
            item["references"].append(row.response_text)
    result = list(items.values())
    for text in eval_settings(config).inputs:
        if text in items:
            continue  # already asked as a held-out input
        cell = parse_input(config, text)
        result.append({"input": text, "cell": cell or {"input": text}, "source": FREE_INPUT, "references": []})
    return result


def answer_params(config: SweepConfig, model: str, input_text: str, seed: int) -> dict[str, Any]:
    """chat.completions.create arguments for one answer: the training format, the [eval] settings,
    the same seed for base and tuned."""
    settings = eval_settings(config)
    return {"model": model, "messages": prompt_messages(config, input_text), "temperature": settings.temperature,
            config.model.token_param: settings.max_output_tokens, "seed": seed}


# The judge prompt's layout; localapi/judge.py (the simulated server's judge) reads the same markers.
JUDGE_SYSTEM = "You are a strict, impartial judge comparing two answers to the same task."
JUDGE_TEMPLATE = """The task: {task}

[Answer A]
{first}
[End of answer A]

[Answer B]
{second}
[End of answer B]

Which answer does the task better: it describes what the task asks for, mentions every detail \
the task names, and stays within {max_words} words? Ignore the order in which they are shown. \
Reply with one word: A, B, or tie."""


def judge_task(config: SweepConfig, item: dict[str, Any]) -> str:
    """What the answers were supposed to do: the generation prompt for the item's cell when it
    renders, else the input itself."""
    cell = item["cell"]
    if set(cell) == set(config.dimensions):
        try:
            return config.render(cell)[0]
        except (KeyError, ValueError, IndexError):
            pass
    return f"Write a description for this input, in at most {eval_settings(config).max_words} words: {item['input']}"


def judge_messages(config: SweepConfig, item: dict[str, Any], first: str, second: str) -> list[dict[str, str]]:
    """The judge's two messages for answers `first` (A) and `second` (B)."""
    user = JUDGE_TEMPLATE.format(task=judge_task(config, item), first=first.strip(), second=second.strip(),
                                 max_words=eval_settings(config).max_words)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# A reply that starts with its verdict: "A", "B.", "**tie**", "Answer B", "Verdict: A", "A is better";
# not an article ("A stubborn man ...").
_VERDICT = re.compile(r"^\W*(?:(?:answer|verdict|option)\W*)?(a|b|tie)(?=\W*$|\s*[.,:;!)*\]\n]|\s+(?:is|wins)\b)",
                      re.IGNORECASE)
_NAMED = re.compile(r"\banswer\s+(a|b)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from the judge's reply; None when it cannot be read (recorded as invalid).

    Read: a reply starting with A / B / tie (also "Answer B", "Verdict: A", "**tie**"), or one that
    names exactly one of "answer A" / "answer B"; anything else is unparseable.
    """
    if not text:
        return None
    named = {m.lower() for m in _NAMED.findall(text)}
    if len(named) == 2:
        return None  # names both: no verdict to read
    if match := _VERDICT.match(text.strip()):
        word = match.group(1).lower()
        return "tie" if word == "tie" else word.upper()
    if len(named) == 1:
        return named.pop().upper()
    if re.search(r"\b(tie|equally good|both equally)\b", text, re.IGNORECASE) and not named:
        return "tie"
    return None


def verdict_winner(position: str, verdict: str | None) -> str:
    """"base", "tuned", "tie" or "invalid" for a verdict given with `position` ("base_first": A is base)."""
    if verdict is None:
        return "invalid"
    if verdict == "tie":
        return "tie"
    first, second = ("base", "tuned") if position == "base_first" else ("tuned", "base")
    return first if verdict == "A" else second


def pair_outcome(first: str, second: str) -> str:
    """Tuned vs base from the two verdicts' winners: "win", "loss", "tie" (they disagree, or both say
    tie) or "invalid" (either is unreadable or missing)."""
    if "invalid" in (first, second):
        return "invalid"
    if first == second:
        return {"tuned": "win", "base": "loss"}.get(first, "tie")
    return "tie"


def checks(text: str | None, cell: dict[str, Any], max_words: int) -> dict[str, bool | None]:
    """The judge-free checks of one answer: within max_words (whitespace words), and mentions each of
    the cell's values (case-insensitive; None for a free input without dimension values)."""
    if not text:
        return {"within_max_words": False, "mentions_values": False if cell and "input" not in cell else None}
    lowered = text.lower()
    mentions = None if not cell or set(cell) == {"input"} else all(str(v).lower() in lowered for v in cell.values())
    return {"within_max_words": len(text.split()) <= max_words, "mentions_values": mentions}


def cell_key(cell: dict[str, Any]) -> str:
    return json.dumps(cell, sort_keys=True)


# --- calling a model: the sweep's rate budget, spend cap and error rules --------------------------
@dataclass(frozen=True)
class Call:
    """One model call's end: an answer body, a final failure, or come back in `retry_in` seconds."""

    body: dict[str, Any] | None = None
    failure: llm.Failure | None = None
    retry_in: float | None = None
    attempts: int = 0
    cost_usd: float | None = None


def call_model(ctx, sweep: Sweep, config: SweepConfig, params: dict[str, Any], attempts: int = 0) -> Call:
    """One chat completion through the shared rate budget (per model and key) and the sweep's spend
    budget, with worker.llm's classification and backoff. Never raises for API trouble."""
    settings = ctx.settings
    model = params["model"]
    max_output = params[config.model.token_param]
    key = ctx.rate_budget(model, config)
    prompt_tokens = count_messages(params["messages"], encoding_name(model))
    reserved = prompt_tokens + max_output
    spend = RequestSpend(ctx.spend, spend_budget_key(sweep), model, sweep.max_cost_usd,
                         pricing.inference_cost(model, prompt_tokens, max_output))
    client = ctx.client
    rate_limited = 0
    while True:
        wait = ctx.limiter.reserve(key, reserved)
        if wait > 0:
            if wait > settings.max_inline_wait:
                return Call(retry_in=min(wait, settings.max_countdown), attempts=attempts)
            time.sleep(wait)
            continue
        if (cap_reached := spend.cap_reached()) is not None:
            ctx.limiter.settle(key, reserved, 0)
            return Call(failure=llm.Failure("spend_cap", f"not sent: {cap_reached}", retryable=False),
                        attempts=attempts)
        attempts += 1
        # the sweep's call path, in-flight slot included
        body, failure, _latency = send_once(ctx, client, key, config, params)
        if failure is None:
            answer = read_completion(body)
            if answer.total_tokens is not None:
                _bookkeeping(ctx.limiter.settle, key, reserved, answer.total_tokens)
            cost = spend.settle(answer if answer.prompt_tokens is not None and answer.completion_tokens is not None
                                else None)
            return Call(body=body, attempts=attempts, cost_usd=cost)
        ctx.limiter.settle(key, reserved, 0)
        spend.release(failure.kind)
        if failure.kind == "rate_limited":
            rate_limited += 1
            wait = failure.retry_after or llm.backoff(rate_limited, settings.backoff_cap)
            ctx.limiter.cool_down(key, wait)
            give_up = rate_limited >= settings.max_attempts * 4
        else:
            wait = failure.retry_after or llm.backoff(attempts, settings.backoff_cap)
            give_up = not failure.retryable or attempts - rate_limited >= settings.max_attempts
        if give_up:
            return Call(failure=failure, attempts=attempts)
        wait = min(wait, settings.max_countdown)
        if wait > settings.max_inline_wait:
            return Call(retry_in=wait, attempts=attempts)
        time.sleep(wait)


def _call_values(ctx, call: Call) -> dict[str, Any]:
    """Row columns for a finished call: state, text (or error), usage, cost."""
    if call.failure is not None:
        return {"state": RowState.FAILED, "error_kind": call.failure.kind, "attempts": call.attempts,
                "error": llm.redact(call.failure.message, ctx.settings)[:2000]}
    answer = read_completion(call.body)
    values = {"model": answer.model, "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
              "completion_tokens": answer.completion_tokens, "cost_usd": call.cost_usd, "attempts": call.attempts}
    if not answer.content:
        return {**values, "state": RowState.FAILED, "error_kind": "empty",
                "error": f"the model refused: {answer.refusal}" if answer.refusal else "the model returned no text"}
    return {**values, "state": RowState.OK, "text": answer.content}


def _stopped(sweep: Sweep) -> llm.Failure | None:
    if sweep.state == SweepState.STOPPED:
        return llm.Failure("stopped", f"not sent: the sweep was stopped ({sweep.stop_reason})", retryable=False)
    return None


# --- the task bodies -----------------------------------------------------------------------------
def run_answer(ctx, eval_id: int, index: int, attempts: int = 0) -> float | None:
    """Answer `index` (item index * 2 + side) of eval `eval_id` and store it; or the seconds after
    which to run again (waiting inline would hold a worker slot too long)."""
    engine = ctx.engine
    item_index, side = divmod(index, 2)
    side_name = SIDES[side]
    if eval_store.has_answer(engine, eval_id, item_index, side_name):
        return None  # redelivered: never call twice
    run = eval_store.get_run(engine, eval_id)
    sweep = store.get_sweep_by_id(engine, run.sweep_id)
    config = store.sweep_config(sweep)
    item = run.items[item_index]
    model = run.base_model if side_name == "base" else run.tuned_model
    call = Call(failure=stopped) if (stopped := _stopped(sweep)) else call_model(
        ctx, sweep, config, answer_params(config, model, item["input"], seed=item_index), attempts)
    if call.retry_in is not None:
        return call.retry_in
    eval_store.insert_answer(engine, {"eval_id": eval_id, "item_index": item_index, "side": side_name,
                                      "finished_at": utcnow(), **_call_values(ctx, call)})
    return None


def run_judgement(ctx, eval_id: int, index: int, attempts: int = 0) -> float | None:
    """Verdict `index` (item index * 2 + position) of eval `eval_id`: the judge sees the base and
    tuned answers in that position and its verdict is stored with its prompt; or seconds to wait."""
    engine = ctx.engine
    item_index, position = divmod(index, 2)
    position_name = POSITIONS[position]
    if eval_store.has_judgement(engine, eval_id, item_index, position_name):
        return None
    run = eval_store.get_run(engine, eval_id)
    sweep = store.get_sweep_by_id(engine, run.sweep_id)
    config = store.sweep_config(sweep)
    item = run.items[item_index]
    texts = {a.side: a.text for a in eval_store.answers(engine, eval_id)
             if a.item_index == item_index and a.state == RowState.OK}
    row = {"eval_id": eval_id, "item_index": item_index, "position": position_name, "model": run.judge_model}
    if len(texts) < 2:
        missing = " and ".join(side for side in SIDES if side not in texts)
        eval_store.insert_judgement(engine, {**row, "state": RowState.FAILED, "error_kind": "no_answer",
                                             "error": f"not judged: no {missing} answer", "attempts": 0})
        return None
    first, second = (texts["base"], texts["tuned"]) if position_name == "base_first" else (texts["tuned"], texts["base"])
    messages = judge_messages(config, item, first, second)
    params = {"model": run.judge_model, "messages": messages, "temperature": 0.0,
              config.model.token_param: JUDGE_MAX_OUTPUT_TOKENS, "seed": JUDGE_SEED}
    call = Call(failure=stopped) if (stopped := _stopped(sweep)) else call_model(ctx, sweep, config, params, attempts)
    if call.retry_in is not None:
        return call.retry_in
    values = _call_values(ctx, call)
    text = values.pop("text", None)
    if values["state"] == RowState.OK:
        values["winner"] = verdict_winner(position_name, parse_verdict(text))
    eval_store.insert_judgement(engine, {**row, **values, "prompt": messages[-1]["content"], "verdict_text": text,
                                         "finished_at": utcnow()})
    return None


def missing_answers(engine, run: EvalRun) -> list[int]:
    have = {(a.item_index, a.side) for a in eval_store.answers(engine, run.id)}
    return [i * 2 + s for i in range(len(run.items)) for s, side in enumerate(SIDES) if (i, side) not in have]


def missing_judgements(engine, run: EvalRun) -> list[int]:
    have = {(j.item_index, j.position) for j in eval_store.judgements(engine, run.id)}
    return [i * 2 + p for i in range(len(run.items)) for p, pos in enumerate(POSITIONS) if (i, pos) not in have]


def start_judging(ctx, eval_id: int) -> list[int] | None:
    """The answers chord's body: the judgement indices to enqueue, or None when answers are still
    missing (a chord of an interrupted enqueue; re-running `eval` resumes)."""
    engine = ctx.engine
    run = eval_store.get_run(engine, eval_id)
    if missing := missing_answers(engine, run):
        log.warning("eval %s: %d answers missing; not judging yet", eval_id, len(missing))
        return None
    if run.state == EvalState.ANSWERING:
        eval_store.set_state(engine, eval_id, EvalState.JUDGING)
    return missing_judgements(engine, run)


def finalize_eval(ctx, eval_id: int) -> str:
    """The judge chord's body: once every verdict is stored, the validation losses (local backend:
    measured here; remote: the provider's, when the job reports them) and the run is done. Once."""
    engine = ctx.engine
    run = eval_store.get_run(engine, eval_id)
    if missing_judgements(engine, run) or missing_answers(engine, run):
        return "incomplete"
    if not eval_store.claim_finalizer(engine, eval_id):
        return "already_finalized"
    try:
        losses = validation_losses(ctx, run)
    except Exception as exc:  # noqa: BLE001 - the verdicts stand without the losses
        log.exception("eval %s: validation losses failed", eval_id)
        losses = {"error": f"{exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0]}"}
    eval_store.finish(engine, eval_id, losses)
    return EvalState.DONE


def validation_losses(ctx, run: EvalRun) -> dict[str, Any] | None:
    """{"source", "overall": {"base", "tuned"}, "cells": {cell_key: {"base", "tuned"}}} or None.

    Local backend: the local trainer's own loss (mean reply-token cross-entropy, nats) of base and
    tuned on the held-out references, per cell. Remote: the job's validation metrics if it has any.
    """
    engine = ctx.engine
    job = store.get_job(engine, run.job_id)
    if job.backend == "local":
        if not any(item["references"] for item in run.items):
            return None
        sweep = store.get_sweep_by_id(engine, run.sweep_id)
        config = store.sweep_config(sweep)
        by_cell: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
        for item in run.items:
            for reference in item["references"]:
                by_cell[cell_key(item["cell"])].append(
                    prompt_messages(config, item["input"]) + [{"role": "assistant", "content": reference}])
        from worker.finetune.local_backend import heldout_losses

        cells, overall = heldout_losses(config.finetune, run.tuned_model, dict(by_cell), ctx.settings.model_cache_dir)
        return {"source": "local", "overall": overall, "cells": cells}
    provider = _provider_metrics(engine, job)
    return {"source": "provider", "overall": provider, "cells": {}} if provider else None


def _provider_metrics(engine, job) -> dict[str, float] | None:
    """The remote job's validation loss: stored before/after, else the last event carrying one."""
    if job.validation_loss_after is not None:
        return {"base": job.validation_loss_before, "tuned": job.validation_loss_after}
    for event in reversed(store.events_after(engine, job.id)):
        data = event.data or {}
        for name in ("full_valid_loss", "valid_loss", "validation_loss"):
            if isinstance(data.get(name), (int, float)):
                return {"base": None, "tuned": float(data[name])}
    return None


# --- creating and resuming a run -----------------------------------------------------------------
def prepare_run(engine, sweep: Sweep) -> EvalRun:
    """The sweep's eval run for its latest tuned model, created on first use (items fixed then).

    UserError when the sweep has no tuned model yet or nothing to evaluate.
    """
    from worker.finetune.ask import finished_job

    job = finished_job(engine, sweep)
    existing = eval_store.find_run(engine, sweep.id, job.id)
    if existing is not None:
        return existing
    config = store.sweep_config(sweep)
    items = build_items(config, store.iter_rows(engine, sweep.id))
    if not items:
        raise UserError(f"sweep {sweep.name} has nothing to evaluate: add an [eval] section with holdout_repeats, "
                        "holdout_cells or inputs to its config (held-out rows must be generated by the sweep)")
    settings = eval_settings(config)
    return eval_store.create_run(engine, {
        "sweep_id": sweep.id, "job_id": job.id, "base_model": job.base_model, "tuned_model": job.fine_tuned_model,
        "judge_model": settings.judge_model or config.model.name, "settings": settings.model_dump(mode="json"),
        "items": items, "state": EvalState.ANSWERING,
    })


# --- the data the report renders -----------------------------------------------------------------
def _rate(values: list[bool | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 4) if known else None


def _tally(outcomes: list[str]) -> dict[str, Any]:
    wins, ties, losses = outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss")
    judged = wins + ties + losses
    return {"wins": wins, "ties": ties, "losses": losses, "judged": judged,
            "invalid_verdicts": outcomes.count("invalid"),
            "win_rate": round((wins + ties / 2) / judged, 4) if judged else None}


def summarize(config: SweepConfig, items: list[dict[str, Any]], answers: dict[tuple[int, str], Any],
              verdicts: dict[tuple[int, str], Any], losses: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics per cell and overall from stored rows (pure).

    answers: (item, side) -> row with .state/.text; verdicts: (item, position) -> row with
    .state/.winner/.verdict_text. A pair counts as judged when both verdicts are readable.
    """
    max_words = eval_settings(config).max_words
    cells: dict[str, dict[str, Any]] = {}
    all_outcomes: list[str] = []
    all_checks: dict[str, dict[str, list]] = {s: defaultdict(list) for s in SIDES}
    samples = []
    for index, item in enumerate(items):
        texts = {side: answers[(index, side)].text if (index, side) in answers
                 and answers[(index, side)].state == RowState.OK else None for side in SIDES}
        winners = [verdicts[(index, p)].winner if (index, p) in verdicts
                   and verdicts[(index, p)].state == RowState.OK else None for p in POSITIONS]
        outcome = pair_outcome(*[w or "invalid" for w in winners]) if all(
            (index, p) in verdicts and verdicts[(index, p)].state == RowState.OK for p in POSITIONS) else None
        key = cell_key(item["cell"])
        cell = cells.setdefault(key, {"cell": item["cell"], "source": item["source"], "n": 0, "outcomes": [],
                                      "checks": {s: defaultdict(list) for s in SIDES}})
        cell["n"] += 1
        if outcome is not None:
            cell["outcomes"].append(outcome)
            all_outcomes.append(outcome)
        for side in SIDES:
            if texts[side] is None:
                continue
            for name, value in checks(texts[side], item["cell"], max_words).items():
                cell["checks"][side][name].append(value)
                all_checks[side][name].append(value)
        samples.append({"cell": item["cell"], "source": item["source"], "input": item["input"],
                        "base": texts["base"], "tuned": texts["tuned"], "outcome": outcome,
                        "verdicts": [{"order": p, "winner": w or "invalid",
                                      "text": verdicts[(index, p)].verdict_text if (index, p) in verdicts else None}
                                     for p, w in zip(POSITIONS, winners)]})
    cell_losses = (losses or {}).get("cells") or {}
    overall = _tally(all_outcomes)
    overall["checks"] = {s: {n: _rate(v) for n, v in all_checks[s].items()} for s in SIDES}
    overall["validation_loss"] = (losses or {}).get("overall")
    out_cells = []
    for key, cell in cells.items():
        entry = {"cell": cell["cell"], "source": cell["source"], "n": cell["n"], **_tally(cell["outcomes"]),
                 "checks": {s: {n: _rate(v) for n, v in cell["checks"][s].items()} for s in SIDES},
                 "validation_loss": cell_losses.get(key)}
        out_cells.append(entry)
    return {"inputs": len(items), "judged": overall["judged"], "overall": overall, "cells": out_cells,
            "samples": samples}


def eval_summary(engine, sweep_name: str) -> dict[str, Any]:
    """The latest eval of `sweep_name` as plain data (the HTML report's contract):

    {"sweep", "state", "base_model", "tuned_model", "judge_model", "dimensions", "inputs", "judged",
     "overall": {"wins", "ties", "losses", "win_rate", "invalid_verdicts", "checks": {"base": {...},
     "tuned": {...}}, "validation_loss": {"base", "tuned"} | None},
     "cells": [{"cell", "source", "n", "wins", "ties", "losses", "win_rate", "checks",
     "validation_loss"}], "samples": [{"cell", "input", "base", "tuned", "verdicts": [{"order",
     "winner"}]}], "tokens": {"answers", "judge"}, "cost_usd": {"answers", "judge"},
     "answers": {"done", "total"}, "judgements": {"done", "total"}}.
    win_rate = (wins + ties / 2) / judged; checks are pass rates in [0, 1]; losses in nats;
    cost_usd None where a model has no price. UserError if the sweep has no eval yet.
    """
    sweep = store.get_sweep(engine, sweep_name)
    run = eval_store.latest_run(engine, sweep.id)
    if run is None:
        raise UserError(f"sweep {sweep.name} has no eval yet: run `python -m producer eval {sweep.name}`")
    config = store.sweep_config(sweep)
    answer_rows = eval_store.answers(engine, run.id)
    verdict_rows = eval_store.judgements(engine, run.id)
    summary = summarize(config, run.items, {(a.item_index, a.side): a for a in answer_rows},
                        {(j.item_index, j.position): j for j in verdict_rows}, run.validation_loss)

    def tokens(rows) -> int:
        return sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in rows)

    def cost(rows) -> float | None:
        priced = [r.cost_usd for r in rows if r.cost_usd is not None]
        return round(sum(priced), 6) if priced or not rows else None

    return {"sweep": sweep.name, "state": run.state, "base_model": run.base_model, "tuned_model": run.tuned_model,
            "judge_model": run.judge_model, "dimensions": list(config.dimensions), **summary,
            "validation_loss_error": (run.validation_loss or {}).get("error"),
            "tokens": {"answers": tokens(answer_rows), "judge": tokens(verdict_rows)},
            "cost_usd": {"answers": cost(answer_rows), "judge": cost(verdict_rows)},
            "answers": {"done": len(answer_rows), "total": 2 * len(run.items)},
            "judgements": {"done": len(verdict_rows), "total": 2 * len(run.items)},
            "created_at": run.created_at.isoformat() if run.created_at else None,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None}

