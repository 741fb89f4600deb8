"""`python -m producer eval NAME`: the tuned model against its base on the held-out set.

Enqueues what is missing of the sweep's eval run (answers, then verdicts, then the finalizer) on
the workers, or on an in-process worker in embedded mode, follows it, and prints the metrics
(worker/evaluation.py computes them; `--json` prints `eval_summary` as it is).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass

from gridtune.settings import get_settings
from models import eval_store, store
from models.schema import EvalRun, EvalState

FOLLOW_INTERVAL_SECONDS = 0.5


def add_commands(commands) -> None:
    evaluate = commands.add_parser("eval", help="the tuned model vs its base on the held-out set ([eval]): "
                                                "checks, judge win rate, validation loss, per grid cell")
    evaluate.add_argument("name", help="the sweep")
    evaluate.add_argument("--wait", action="store_true", help="with workers: follow until the eval is done "
                                                              "(embedded mode always does)")
    evaluate.add_argument("--timeout", type=float, default=None, help="with --wait: stop following after this many seconds")
    evaluate.add_argument("--json", action="store_true", help="print the eval summary as one JSON document")
    evaluate.set_defaults(handler=cmd_eval)


@dataclass(frozen=True)
class EvalEnqueued:
    run: EvalRun
    answers: int  # answer tasks sent
    verdicts: int  # verdict tasks sent
    finalizer: bool  # the finalizer alone was sent


def enqueue_eval(engine, sweep) -> EvalEnqueued:
    """Create (or resume) the sweep's eval run and send only what is missing: failed rows are tried
    again; a done run with nothing missing sends nothing. UserError if there is no tuned model or
    nothing to evaluate."""
    from worker.eval_tasks import eval_answer, eval_judge, eval_verdict, finalizer, send_stage
    from worker.evaluation import missing_answers, missing_judgements, prepare_run

    run = prepare_run(engine, sweep)
    forgotten = eval_store.forget_failed(engine, run.id)
    if sweep.max_cost_usd is not None:
        _open_spend_budget(engine, sweep, run)
    answers = missing_answers(engine, run)
    if answers:
        eval_store.set_state(engine, run.id, EvalState.ANSWERING)
        send_stage(run.id, eval_answer, answers, eval_judge.si(run.id))
        return EvalEnqueued(eval_store.get_run(engine, run.id), len(answers), 0, False)
    verdicts = missing_judgements(engine, run)
    if not verdicts and run.state == EvalState.DONE and not forgotten:
        return EvalEnqueued(run, 0, 0, False)
    # Judging again, or a finalizer that never finished (its worker died): it may run once more.
    eval_store.set_state(engine, run.id, EvalState.JUDGING)
    send_stage(run.id, eval_verdict, verdicts, finalizer(run.id))
    return EvalEnqueued(eval_store.get_run(engine, run.id), 0, len(verdicts), not verdicts)


def _open_spend_budget(engine, sweep, run: EvalRun) -> None:
    """The eval spends from the sweep's capped budget: tell it what the database says was spent
    (the sweep's rows and the eval's so far), as a resumed sweep does."""
    from worker.context import get_context
    from worker.spend import open_budget

    spent = store.sweep_counts(engine, sweep).cost_usd or 0.0
    spent += sum(row.cost_usd or 0.0 for row in [*eval_store.answers(engine, run.id),
                                                 *eval_store.judgements(engine, run.id)])
    open_budget(get_context().spend, sweep, spent)


def progress_line(run: EvalRun, answers: int, verdicts: int) -> str:
    total = 2 * len(run.items)
    return f"  eval {run.id}: {run.state}; answers {answers}/{total}, verdicts {verdicts}/{total}"


def follow(engine, eval_id: int, timeout: float | None) -> EvalRun:
    """Print progress on stderr until the run is done or `timeout` seconds pass; the last run row."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        run = eval_store.get_run(engine, eval_id)
        line = progress_line(run, len(eval_store.answers(engine, eval_id)), len(eval_store.judgements(engine, eval_id)))
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if run.state == EvalState.DONE or (deadline is not None and time.monotonic() > deadline):
            return run
        time.sleep(FOLLOW_INTERVAL_SECONDS)


def _rate(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def describe(summary: dict) -> str:
    """The eval summary as a few lines for people."""
    overall = summary["overall"]
    lines = [f"eval of {summary['sweep']} ({summary['state']}): tuned {summary['tuned_model']} vs base "
             f"{summary['base_model']}, judge {summary['judge_model']}",
             f"  {summary['inputs']} held-out inputs, {summary['judged']} judged both ways: "
             f"{overall['wins']} wins, {overall['ties']} ties, {overall['losses']} losses for the tuned model; "
             f"win rate {_rate(overall['win_rate'])}"
             + (f" ({overall['invalid_verdicts']} with an unreadable verdict)" if overall["invalid_verdicts"] else "")]
    names = {"within_max_words": "within the word limit", "mentions_values": "mentions the cell's values"}
    lines.append(f"  {'':28} {'base':>6} {'tuned':>6}")
    for key, label in names.items():
        lines.append(f"  {label:28} {_rate(overall['checks']['base'].get(key)):>6} "
                     f"{_rate(overall['checks']['tuned'].get(key)):>6}")
    if loss := overall.get("validation_loss"):
        lines.append(f"  {'validation loss (nats)':28} {_rate(loss.get('base')):>6} {_rate(loss.get('tuned')):>6}")
    elif summary.get("validation_loss_error"):
        lines.append(f"  validation loss: not measured: {summary['validation_loss_error']}")
    cells = sorted((c for c in summary["cells"] if c["win_rate"] is not None), key=lambda c: -c["win_rate"])
    if cells:
        lines.append("  win rate by cell (best first):")
        for cell in cells[:5] + ([{"cell": "..."}] if len(cells) > 10 else []) + cells[max(5, len(cells) - 5):]:
            if cell["cell"] == "...":
                lines.append("    ...")
                continue
            label = ", ".join(f"{v}" for v in cell["cell"].values())
            lines.append(f"    {_rate(cell['win_rate']):>5}  {label}  (n={cell['n']}, {cell['source']})")
    tokens, cost = summary["tokens"], summary["cost_usd"]
    money = " + ".join("n/a" if v is None else f"${v:.4f}" for v in (cost["answers"], cost["judge"]))
    lines.append(f"  tokens: {tokens['answers']:,} answering, {tokens['judge']:,} judging; cost {money}")
    return "\n".join(lines)


def _write_report(engine, name: str) -> str:
    """The HTML report (producer/report.py) with this evaluation in it; its absolute path."""
    from producer.report import write_report

    return str(write_report(engine, name).resolve())


def cmd_eval(args: argparse.Namespace) -> int:
    from producer.cli import _check_broker, _embedded_runtime, _engine
    from worker.app import app
    from worker.evaluation import eval_summary
    from worker.finetune.ask import finished_job

    settings = get_settings()
    engine = _engine()
    sweep = store.get_sweep(engine, args.name)
    job = finished_job(engine, sweep)
    local_model = job.fine_tuned_model if job.backend == "local" else None
    if local_model:
        from gridtune.localmodel import check_adapter

        check_adapter(local_model)
    from worker.evaluation import prepare_run

    prepare_run(engine, sweep)  # nothing to evaluate: one line before anything starts
    _check_broker(app)
    wait = args.wait or settings.embedded
    with ExitStack() as stack:
        if settings.embedded:
            stack.enter_context(_embedded_runtime(local_model, args.verbose))
        result = enqueue_eval(engine, sweep)
        print(f"eval of {sweep.name}: {len(result.run.items)} inputs; sent {result.answers} answers, "
              f"{result.verdicts} verdicts{' and the finalizer' if result.finalizer else ''}",
              file=sys.stderr, flush=True)
        run = result.run
        if wait and (result.answers or result.verdicts or result.finalizer):
            run = follow(engine, run.id, args.timeout)
    summary = eval_summary(engine, sweep.name)
    report = _write_report(engine, sweep.name) if run.state == EvalState.DONE else None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(describe(summary))
        if report:
            print(f"  report: {report}")
    if wait and run.state != EvalState.DONE:
        print(f"gridtune: eval of {sweep.name} still {run.state} after {args.timeout}s; re-run "
              f"`python -m producer eval {sweep.name} --wait` to follow or resume it", file=sys.stderr)
        return 1
    if not wait:
        print(f"follow it with `python -m producer eval {sweep.name} --wait`", file=sys.stderr)
    return 0

