"""`python -m producer ...`: create, resume, follow and export sweeps; fine-tune and ask.

Every failure the user can fix is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from gridtune.errors import UserError
from gridtune.settings import get_settings

log = logging.getLogger("gridtune")


def _engine():
    from models import get_engine

    return get_engine(get_settings().database_url)


def _check_broker(app) -> None:
    """Fail fast, with the URL, when the broker or result backend cannot be reached."""
    from kombu.exceptions import OperationalError as KombuOperationalError

    settings = get_settings()
    if settings.embedded:
        return
    from models.db import safe_url

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except (KombuOperationalError, OSError) as exc:
        raise UserError(f"cannot reach the broker at {safe_url(settings.broker_url)}: {exc}") from None
    try:
        app.backend.client.ping()
    except AttributeError:
        pass  # not a Redis backend
    except Exception as exc:  # noqa: BLE001 - any failure here means the backend is unusable
        raise UserError(f"cannot reach the result backend: {exc}") from None


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence `logger` (and its children) for the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        target.setLevel(level)


@contextmanager
def _embedded_runtime(local_model: str | None, verbose: bool = False) -> Iterator[None]:
    """Embedded mode: a local API server when there is no key (or the model is local), and an
    in-process worker, whose log is silenced unless `verbose`: its warnings and errors all end in
    rows and the summary, so logging them too would print each of them twice."""
    from worker.app import app
    from worker.embedded import in_process_worker, local_api_when_keyless

    purpose = "generating" if local_model else "running"
    with ExitStack() as stack:
        stack.enter_context(local_api_when_keyless(purpose, local_model))
        stack.enter_context(in_process_worker(app, get_settings().embedded_concurrency))
        if not verbose:
            stack.enter_context(_quiet("worker"))
        yield


def _default_config(settings, simulated: bool) -> str:
    """The bundled config `sweep` runs without --config: the packaged local model when there is no
    key (and no OPENAI_BASE_URL), else the tutorial's OpenAI models; --simulated keeps the latter
    on the simulated local server."""
    from gridtune.sweep import DEFAULT_CONFIG, LOCAL_CONFIG

    if settings.openai_api_key or settings.openai_base_url or simulated:
        return DEFAULT_CONFIG
    return LOCAL_CONFIG


def _check_local_models(config) -> str | None:
    """Resolve (convert once) the sweep's local models before anything is stored; the generation
    model's name when it is local."""
    from gridtune.localmodel import check_config, is_local_model

    def converting(alias: str) -> None:
        print(f"converting the packaged model {alias} for transformers (once; about 20 s) into "
              f"{get_settings().model_cache_dir}", file=sys.stderr, flush=True)

    check_config(config, on_convert=converting)
    return config.model.name if is_local_model(config.model.name) else None


def _sweep_name(args: argparse.Namespace, config) -> str:
    return args.name or config.name or (Path(args.config).stem if args.config else "superhero")


def _existing_engine():
    """The database when it already exists and answers, else None (an estimate creates nothing)."""
    from sqlalchemy.engine import make_url

    url = get_settings().database_url
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and (not parsed.database or not Path(parsed.database).exists()):
            return None
        return _engine()
    except Exception:  # noqa: BLE001 - no history is a fine answer for an estimate
        log.info("no database for the estimate's history", exc_info=True)
        return None


def cmd_estimate(args: argparse.Namespace) -> int:
    """`estimate` and `sweep --dry-run`: the pre-flight estimate; stores and sends nothing."""
    from gridtune.sweep import load_config
    from producer.estimate import History, describe, estimate

    settings = get_settings()
    bundled = _default_config(settings, getattr(args, "simulated", False))
    config = load_config(args.config, max_requests=settings.max_requests, bundled=bundled)
    name = _sweep_name(args, config)
    history = None
    engine = _existing_engine()
    if engine is not None:
        from models import store

        history = History(*store.output_history(engine, config.model.name))

    def learnt():
        import redis

        from worker.ratelimit import Limits, RateLimiter

        url = settings.shared_redis_url
        if not url:
            return Limits()
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        return RateLimiter(client).learnt(config.model.name + ":")

    cap = args.max_cost if args.max_cost is not None else config.model.max_cost_usd
    est = estimate(name, config, settings, history=history, learnt=learnt, max_cost_usd=cap)
    if args.json:
        print(json.dumps(est.as_json(), indent=2))
    else:
        print(describe(est))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gridtune.backend_rules import grid_problems
    from gridtune.sweep import load_config
    from producer import progress
    from producer.enqueue import enqueue_sweep
    from worker.app import app

    if args.dry_run:
        return cmd_estimate(args)
    settings = get_settings()
    bundled = _default_config(settings, args.simulated)
    config = load_config(args.config, max_requests=settings.max_requests, bundled=bundled)
    if problems := grid_problems(config):  # before anything is stored or sent
        raise UserError(f"{args.config or f'sweeps/{bundled}'}: " + "; ".join(problems))
    name = args.sweep_name = _sweep_name(args, config)
    if args.config is None:
        print(f"config: the bundled sweeps/{bundled}", file=sys.stderr, flush=True)
    from gridtune.localmodel import is_local_model

    if is_local_model(config.model.name) and (args.batch or (config.model.mode == "batch" and not args.online)):
        raise UserError(f"batch mode needs a provider's /v1/batches; the local model {config.model.name} is "
                        "served online only: drop --batch / mode = \"batch\"")
    local_model = _check_local_models(config)
    if args.max_cost is not None or config.model.max_cost_usd is not None:
        from worker.spend import require_price

        require_price(config)  # before anything starts or is stored
    engine = _engine()
    _check_broker(app)
    wait = args.wait or settings.embedded
    with ExitStack() as stack:
        if settings.embedded:
            stack.enter_context(_embedded_runtime(local_model, args.verbose))
        print(f"sweep {name}: {config.total_requests:,} requests "
              f"({config.combinations:,} combinations x {config.repeats} repeats)", file=sys.stderr, flush=True)

        def on_progress(sent: int) -> None:
            print(f"  enqueued {sent:,}", file=sys.stderr, flush=True)

        result = enqueue_sweep(app, engine, name, config, replace_config=args.replace_config,
                               batch=settings.enqueue_batch, on_progress=on_progress, max_cost_usd=args.max_cost,
                               mode="batch" if args.batch else "online" if args.online else None,
                               max_requests=settings.batch_max_requests,
                               max_bytes=settings.batch_max_bytes)
        verb = "created" if result.created else "resumed"
        batches = (f" in {result.new_batches} batches" if result.new_batches else "") + (
            f", {result.open_batches} batches in flight followed" if result.open_batches else "")
        print(f"sweep {name} {verb}: {result.sent:,} requests enqueued{batches}, {result.already_done:,} already done",
              file=sys.stderr, flush=True)
        if result.sent == 0 and not result.created and not result.open_batches:
            print(f"nothing to do: every request of {name} has an ok row "
                  f"(state {result.sweep.state}); `python -m producer finetune {name}` re-runs the fine-tune step",
                  file=sys.stderr)
        if not wait or (result.sent == 0 and not result.open_batches):
            if args.json:
                progress.dump_json(progress.snapshot(engine, name))
            return 0
        snap = progress.follow(engine, name, timeout=args.timeout, as_json=args.json,
                               in_flight=_in_flight_counter(engine, name), on_tick=_stall_watch(engine, name))
        # While the embedded local server still runs: one answer of the tuned model.
        sample = _sample_tuned(engine, name) if settings.embedded and not args.json else None
    if args.json:
        progress.dump_json(snap)
    else:
        print(progress.describe(snap))
        _print_after_sweep(engine, name, asked=bool(sample))
        if sample:
            print(sample)
    if not progress.is_finished(snap):
        print(f"gridtune: still running after {args.timeout}s; follow with `python -m producer status {name} --watch`",
              file=sys.stderr)
        return 1
    return exit_code(snap)


def _print_after_sweep(engine, name: str, asked: bool = False) -> None:
    """Where the database and the dataset files are, notes on the counts, and the next command."""
    from producer.progress import wrap
    from producer.summary import after_sweep

    print(wrap(after_sweep(engine, name, asked)))


# A fine-tune that failed or was cancelled fails the command too. `unavailable` (the provider refuses
# fine-tuning to this organization: OpenAI's 403 training_not_available, everyone from 2027-01-06) is
# an expected outcome, recorded on the job and explained by the summary: the dataset is the product.
FINETUNE_FAILURES = ("failed", "cancelled")


def exit_code(snap: dict) -> int:
    """0 when the sweep ended well: not `failed`, and its fine-tune (if any) did not fail."""
    if snap["state"] == "failed":
        return 1
    job = snap.get("finetune")
    return 1 if job and job["status"] in FINETUNE_FAILURES else 0


def _sample_tuned(engine, name: str) -> str | None:
    """Lines showing the tuned model's answer to the config's [ask] example and how to ask more;
    None when the sweep has no tuned model."""
    import shlex

    from models import JobStatus, store
    from producer.tuning import worker_context
    from worker.finetune.ask import example_input, sample

    sweep = store.get_sweep(engine, name)
    job = store.latest_job(engine, sweep.id)
    if job is None or job.status != JobStatus.SUCCEEDED:
        return None
    text = example_input(store.sweep_config(sweep))
    try:
        # A local adapter is served by a local server started for it here; a remote model by the API.
        with worker_context(needs_api=True, local_model=job.fine_tuned_model if job.backend == "local" else None) as ctx:
            answer = sample(ctx, sweep, job, text)
    except UserError as exc:
        answer = f"(could not ask it: {exc})"
    return (f"\nthe tuned model, asked {text!r}:\n  {answer}\n"
            f"ask it more: python -m producer ask {shlex.quote(name)} {shlex.quote(text)}")


def _in_flight_counter(engine, name: str):
    """A callable giving the sweep's in-flight requests, or None where no shared Redis is known."""
    from models import store
    from worker.context import count_in_flight, get_context

    settings = get_settings()
    if not (settings.embedded or settings.shared_redis_url):
        return lambda: None
    sweep_id = store.get_sweep(engine, name).id
    client = get_context().redis

    def count() -> int | None:
        try:
            return count_in_flight(client, sweep_id)
        except Exception:  # noqa: BLE001 - progress must not die with Redis
            return None

    return count


def _stall_watch(engine, name: str):
    """The stall watchdog for a distributed sweep on a Redis broker (else a no-op)."""
    import redis

    from models import store
    from producer.enqueue import enqueue_sweep
    from producer.recovery import StallWatch, broker_idle
    from worker.app import app

    settings = get_settings()
    if settings.embedded or not settings.broker_url.startswith(("redis://", "rediss://")):
        return lambda snap: None
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    queues = (app.conf.task_default_queue,)

    def resume() -> int:
        config = store.sweep_config(store.get_sweep(engine, name))
        return enqueue_sweep(app, engine, name, config, batch=settings.enqueue_batch,
                             max_requests=settings.batch_max_requests, max_bytes=settings.batch_max_bytes).sent

    return StallWatch(lambda: broker_idle(client, queues), resume, settings.stall_seconds)


def cmd_status(args: argparse.Namespace) -> int:
    from producer import progress

    engine = _engine()
    counter = _in_flight_counter(engine, args.name)
    if args.watch:
        snap = progress.follow(engine, args.name, interval=args.interval, as_json=args.json, in_flight=counter,
                               on_tick=_stall_watch(engine, args.name))
    else:
        snap = progress.snapshot(engine, args.name, counter())
    if args.json:
        progress.dump_json(snap)
    else:
        print(progress.describe(snap))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from models import store
    from models.db import describe_database

    from producer.progress import spent_usd

    engine = _engine()
    sweeps = store.list_sweeps(engine)
    spent = {s.id: spent_usd(store.sweep_counts(engine, s), store.sweep_config(s).model.name) for s in sweeps}
    if args.json:
        print(json.dumps([{"name": s.name, "state": s.state, "total": s.total_requests, "spent_usd": spent[s.id],
                           "max_cost_usd": s.max_cost_usd, "created_at": s.created_at.isoformat()} for s in sweeps],
                         indent=2))
        return 0
    for s in sweeps:
        money = "n/a" if spent[s.id] is None else f"${spent[s.id]:,.4f}"
        cap = f" of ${s.max_cost_usd:,.4f}" if s.max_cost_usd is not None else ""
        print(f"{s.name:30} {s.state:15} {s.total_requests:>10,} requests  spent {money}{cap}  "
              f"created {s.created_at:%Y-%m-%d %H:%M}")
    if not sweeps:
        print(f"no sweeps yet in {describe_database(engine)}: run `python -m producer sweep`, "
              "or point DATABASE_URL at the database that has them", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the sweep's HTML report (grid heatmaps, loss curves, dataset report, samples)."""
    from producer.report import write_report

    written = write_report(_engine(), args.name, args.out)
    print(f"wrote the report of {args.name} to {written} ({written.stat().st_size / 1024:,.0f} KiB): "
          "open it in a browser", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Stop a sweep: online requests not yet sent store "not sent" rows, batches are cancelled at the
    provider (what they finished is kept); the finalizer still runs once every row exists."""
    from models import store
    from worker.app import app
    from worker.tasks import batch_cancel

    engine = _engine()
    sweep = store.get_sweep(engine, args.name)
    _check_broker(app)
    stopped = store.stop_sweep(engine, sweep.id, "cancelled by the user")
    batches = [b for b in store.open_batches(engine, sweep.id) if b.provider_batch_id is not None]
    for batch in batches:
        batch_cancel.apply_async((batch.id,))
    if not stopped and not batches:
        print(f"sweep {sweep.name} is {sweep.state}: nothing to cancel", file=sys.stderr)
        return 0
    print(f"sweep {sweep.name} cancelled: requests not sent yet store 'not sent' rows; "
          f"{len(batches)} batches asked to cancel", file=sys.stderr)
    if get_settings().embedded:
        print("gridtune: embedded mode has no workers outside `sweep`: re-run `sweep` to store the rest",
              file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Writers live in producer/exports.py; this only checks what was asked and dispatches."""
    from models import store
    from producer import exports

    tables = (args.parquet, args.hf_dataset, args.training_set_parquet, args.training_set_hf_dataset)
    if not (args.csv or args.jsonl or args.training_set or any(tables)):
        raise UserError("say what to write: --csv PATH, --jsonl PATH, --training-set PATH, --parquet FILE, "
                        "--hf-dataset DIR, --training-set-parquet FILE and/or --training-set-hf-dataset DIR")
    engine = _engine()
    sweep = store.get_sweep(engine, args.name)
    config = store.sweep_config(sweep)
    if args.training_set:
        exports.export_training_jsonl(engine, sweep, args.training_set)
    if any(tables):
        exports.export_tables(engine, sweep, config, parquet=args.parquet, hf_dataset=args.hf_dataset,
                              training_parquet=args.training_set_parquet,
                              training_hf_dataset=args.training_set_hf_dataset)
    if args.csv or args.jsonl:
        exports.export_rows_text(engine, sweep, config, args.csv, args.jsonl, args.legacy)
    return 0


def _usd(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount of USD: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be more than 0 USD, not {text}")
    return value


def _resume_hint(args: argparse.Namespace) -> str:
    """What to run after Ctrl-C: the same command, or `finetune` when the fine-tune step was cut."""
    name = getattr(args, "sweep_name", None)
    if args.command == "sweep" and name:
        try:
            from models import SweepState, store

            state = store.get_sweep(_engine(), name).state
        except Exception:  # noqa: BLE001 - a hint must not raise
            state = None
        if state in (SweepState.DATASET_READY, SweepState.FINETUNING):
            return (f"the requests are done; the fine-tune step was cut: `python -m producer finetune {name}` "
                    "runs it again (`python -m producer jobs` shows it)")
    return "re-run the same command to resume"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description="gridtune: a grid of prompt parameters -> a fine-tuning dataset -> a fine-tuned model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sweep = commands.add_parser("sweep", help="create a sweep and enqueue its requests (re-run to resume)")
    sweep.add_argument("--config", help="sweep config TOML (default: sweeps/superhero-local.toml without "
                                        "OPENAI_API_KEY, else sweeps/superhero.toml)")
    sweep.add_argument("--simulated", action="store_true",
                       help="without a key: the tutorial's config on the fast SIMULATED server (seconds, filler text)")
    sweep.add_argument("--name", help="sweep name (default: the config's `name`)")
    sweep.add_argument("--wait", action="store_true", help="follow progress until the sweep ends (always, embedded)")
    sweep.add_argument("--timeout", type=float, default=None, help="with --wait: stop waiting after this many seconds")
    sweep.add_argument("--replace-config", action="store_true",
                       help="resume an existing sweep with a different config")
    sweep.add_argument("--json", action="store_true", help="print the final status as JSON")
    sweep.add_argument("--max-cost", type=_usd, metavar="USD",
                       help="spend cap in USD (overrides [model] max_cost_usd); re-run with a higher one to resume")
    how = sweep.add_mutually_exclusive_group()
    how.add_argument("--batch", action="store_true",
                     help="send through the provider's Batch API (half price, results within 24 h); = [model] mode")
    how.add_argument("--online", action="store_true",
                     help="one API call per request (the default); on resume: retry a batch sweep's failures online")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the pre-flight estimate (requests, tokens, cost, time); store and send nothing")
    sweep.set_defaults(handler=cmd_sweep)

    estimate = commands.add_parser("estimate", help="the pre-flight estimate of a sweep (same as sweep --dry-run)")
    estimate.add_argument("--config", help="sweep config TOML (default: sweeps/superhero.toml)")
    estimate.add_argument("--name", help="sweep name (default: the config's `name`)")
    estimate.add_argument("--max-cost", type=_usd, metavar="USD", help="show what this spend cap allows")
    estimate.add_argument("--json", action="store_true", help="one JSON document for scripts")
    estimate.set_defaults(handler=cmd_estimate)

    status = commands.add_parser("status", help="counts by state, tokens, pace, spend (vs cap), batches, time left")
    status.add_argument("name")
    status.add_argument("--watch", action="store_true", help="follow live until the sweep ends")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    status.add_argument("--json", action="store_true", help="one JSON document for scripts")
    status.set_defaults(handler=cmd_status)

    listing = commands.add_parser("list", help="all sweeps, with their spend")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)

    cancel = commands.add_parser("cancel", help="stop a sweep: cancel its batches and its online requests not yet sent")
    cancel.add_argument("name")
    cancel.set_defaults(handler=cmd_cancel)

    report = commands.add_parser("report", help="write the sweep's HTML report: heatmaps per cell, loss curves, dataset")
    report.add_argument("name")
    report.add_argument("--out", help="the HTML file (default: GRIDTUNE_DATA_DIR/NAME/report.html)")
    report.set_defaults(handler=cmd_report)

    export = commands.add_parser("export", help="write a sweep's rows (CSV, JSONL, Parquet, a datasets folder) "
                                                "or its training set")
    export.add_argument("name")
    export.add_argument("--csv", help="the tutorial's columns, one row per request")
    export.add_argument("--jsonl", help="a chat-format line for every whole ok answer (duplicates included, no split)")
    export.add_argument("--training-set", help="the finalizer's train.jsonl: deduplicated and validated, what is uploaded")
    export.add_argument("--legacy", action="store_true", help="with --jsonl: prompt/completion form (' ->', ' END')")
    export.add_argument("--parquet", metavar="FILE",
                        help="every row as Parquet: the grid's dimensions, prompt, input, response, finish_reason, "
                             "tokens, cost, split (train/validation/heldout/failed/the reason it was dropped)")
    export.add_argument("--hf-dataset", metavar="DIR", help="the same as a Hugging Face datasets folder (load_from_disk)")
    export.add_argument("--training-set-parquet", metavar="FILE",
                        help="the training set itself (train + validation after filtering), with `messages`, as Parquet")
    export.add_argument("--training-set-hf-dataset", metavar="DIR",
                        help="the training set as a datasets folder: a DatasetDict with train (and validation)")
    export.set_defaults(handler=cmd_export)

    from producer import evaluate, tuning

    tuning.add_commands(commands)
    evaluate.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        get_settings()  # every environment variable is checked before any command runs
        return args.handler(args)
    except UserError as exc:
        print(f"gridtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"gridtune: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # the reader went away (`| head`): not an error
    except Exception as exc:  # noqa: BLE001 - a bug still gets one line, the traceback on -v
        if args.verbose:
            raise
        print(f"gridtune: internal error: {exc.__class__.__name__}: {exc} (run with -v for the traceback)",
              file=sys.stderr)
        return 1
