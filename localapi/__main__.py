"""`python -m localapi` / `gridtune-localapi`: serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .budget import LIMIT_MODELS
from .config import FAULT_KINDS, FINETUNE_OUTCOMES, ServerConfig
from .server import LocalAPIServer

DEFAULTS = ServerConfig()


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localapi",
        description="A local OpenAI-compatible server (chat completions, files, batches, fine-tuning) for tests and benchmarks.",
    )
    add = parser.add_argument
    add("--host", default=DEFAULTS.host)
    add("--port", type=int, default=DEFAULTS.port, help="0 picks a free port (default)")
    add("--latency-ms", type=float, default=DEFAULTS.latency_ms, help="added to every accepted chat completion")
    add("--latency-jitter-ms", type=float, default=DEFAULTS.latency_jitter_ms, help="uniform +/- around --latency-ms")
    add("--rpm", type=int, default=DEFAULTS.rpm, help="requests per minute per API key (default: unlimited)")
    add("--tpm", type=int, default=DEFAULTS.tpm, help="tokens per minute per API key (default: unlimited)")
    add(
        "--burst-seconds",
        type=float,
        default=DEFAULTS.burst_seconds,
        help="how many seconds' worth of the limits may be spent at once",
    )
    add("--overload-capacity", type=int, default=DEFAULTS.overload_capacity,
        help="overload mode: this many requests take --latency-ms at once; more share the server and all "
             "slow down (latency grows with concurrency, nothing is refused)")
    add(
        "--limit-model",
        choices=LIMIT_MODELS,
        default=DEFAULTS.limit_model,
        help="window: a burst_seconds bucket and a sliding minute (default); token-bucket: a minute's "
        "bucket, full at start, refilled continuously; per-second: limit/60 per second, 429s without retry-after",
    )
    add("--fault-rate", type=float, default=DEFAULTS.fault_rate, help="chance that a chat completion fails")
    add(
        "--faults",
        type=_comma_list,
        default=DEFAULTS.faults,
        help=f"comma-separated fault kinds to draw from (default: {','.join(FAULT_KINDS)})",
    )
    add("--hang-seconds", type=float, default=DEFAULTS.hang_seconds, help='how long a "timeout" fault hangs')
    add(
        "--retry-after",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.retry_after,
        help="send retry-after-ms / retry-after on 429s",
    )
    add("--api-keys", type=_comma_list, default=DEFAULTS.api_keys, help="comma-separated keys to accept (default: any)")
    add(
        "--quota-exhausted-keys",
        type=_comma_list,
        default=DEFAULTS.quota_exhausted_keys,
        help="comma-separated keys answered with insufficient_quota",
    )
    add("--finetune-outcome", choices=FINETUNE_OUTCOMES, default=DEFAULTS.finetune_outcome)
    add(
        "--finetune-step-seconds",
        type=float,
        default=DEFAULTS.finetune_step_seconds,
        help="time between a fine-tuning job's status changes",
    )
    add(
        "--serve-unknown-tuned",
        action="store_true",
        help="answer ft:<base>:gridtune:... models trained by an earlier run of the server",
    )
    add("--max-batch", type=int, default=DEFAULTS.max_batch,
        help="real models (smollm2-135m, a model folder, an adapter folder): requests generated together")
    add("--batch-seconds", type=float, default=DEFAULTS.batch_seconds,
        help="how long a /v1/batches batch takes from create to its end")
    add("--batch-failure-rate", type=float, default=DEFAULTS.batch_failure_rate,
        help="share of a batch's lines that fail (500, in the error file)")
    add("--batch-completion-fraction", type=float, default=DEFAULTS.batch_completion_fraction,
        help="share of a batch's lines done before it expires (1 = it completes)")
    add("--seed", type=int, default=DEFAULTS.seed, help="seeds replies and fault draws")
    return parser


async def _serve(config: ServerConfig) -> None:
    server = LocalAPIServer(config)
    try:
        await server.start()
    except OSError as error:
        await server.close()
        sys.exit(f"localapi: cannot listen on {config.host}:{config.port}: {error.strerror or error}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"localapi listening on {server.base_url}", flush=True)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ServerConfig(**vars(args))
    except ValueError as error:
        parser.error(str(error))
    asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
