"""Batch mode at scale: plan, build + upload, and ingest a sweep of N requests (default 100k)
through the local server's /v1/batches, with a throw-away Postgres database.

    python bench/batch.py [--requests 100000] [--sqlite]

Prints one JSON document: seconds and producer/worker memory (ru_maxrss growth) per phase, the
server's processing time, ingest rows/s per output file, and the check that every request has
exactly one row. The steps are the plain functions the Celery tasks call (worker/batch.py), run
in this process, so the figures are gridtune's own cost without broker latency.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import postgres_database  # noqa: E402

CONFIG = """
[dimensions]
hero = {heroes}
power = {powers}
[templates]
system = "You write short character sketches."
prompt = "Describe hero number {{hero}}, whose superpower is {{power}}, in two sentences."
input = "{{hero}}, {{power}}"
[model]
name = "gpt-4o-mini"
max_output_tokens = 60
[finetune]
backend = "none"
"""


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(db_url: str, requests: int) -> dict:
    import localapi
    from gridtune.settings import Settings
    from gridtune.sweep import parse_config
    from models import store
    from worker import batch as batch_mode
    from worker.context import WorkerContext

    powers = ["flight", "invisibility", "healing", "speed", "strength", "telepathy", "time travel", "x-ray vision",
              "shape-shifting", "weather control"]
    heroes = list(range(requests // len(powers)))
    config = parse_config(CONFIG.format(heroes=json.dumps(heroes), powers=json.dumps(powers)))
    result: dict = {"requests": config.total_requests}
    with localapi.running(batch_seconds=0.3) as server:
        ctx = WorkerContext(Settings(DATABASE_URL=db_url, OPENAI_API_KEY="sk-bench-batch",
                                     OPENAI_BASE_URL=server.base_url, GRIDTUNE_REQUEST_TIMEOUT=600))
        ctx.engine  # noqa: B018 - connect and create the schema outside the timings
        sweep, _ = store.create_or_resume_sweep(ctx.engine, "bench-batch", config)

        rss, started = rss_mb(), time.perf_counter()
        plan = batch_mode.plan_batches(config, sweep.id, range(config.total_requests),
                                       ctx.settings.batch_max_requests, ctx.settings.batch_max_bytes)
        ids = store.add_batches(ctx.engine, sweep.id, plan)
        result["plan"] = {"seconds": round(time.perf_counter() - started, 2), "batches": len(ids),
                          "rss_growth_mb": round(rss_mb() - rss, 1)}

        rss, started = rss_mb(), time.perf_counter()
        sizes = []
        for batch_id in ids:
            batch = store.get_batch(ctx.engine, batch_id)
            sizes.append(len(batch_mode.input_file(config, sweep.id, batch.ranges)))
        built = time.perf_counter() - started
        for batch_id in ids:
            batch_mode.submit(ctx, batch_id)
        result["build_and_upload"] = {
            "seconds": round(time.perf_counter() - started - built, 2), "build_only_seconds": round(built, 2),
            "file_mb": [round(size / 1e6, 1) for size in sizes], "rss_growth_mb": round(rss_mb() - rss, 1)}

        started = time.perf_counter()
        while True:
            statuses = [ctx.client.batches.retrieve(store.get_batch(ctx.engine, i).provider_batch_id).status
                        for i in ids]
            if all(status in ("completed", "failed", "expired", "cancelled") for status in statuses):
                break
            time.sleep(0.5)
        result["server_processing_seconds"] = round(time.perf_counter() - started, 1)

        rss, ingests = rss_mb(), []
        for batch_id in ids:
            batch = store.get_batch(ctx.engine, batch_id)
            remote = ctx.client.batches.retrieve(batch.provider_batch_id)
            started = time.perf_counter()
            output = ctx.client.files.content(remote.output_file_id).content
            downloaded = time.perf_counter() - started
            started = time.perf_counter()
            batch_mode.ingest(ctx, batch, output, b"")
            seconds = time.perf_counter() - started
            ingests.append({"lines": batch.request_count, "download_seconds": round(downloaded, 2),
                            "ingest_seconds": round(seconds, 2), "rows_per_second": round(batch.request_count / seconds)})
        result["ingest"] = ingests
        result["ingest_rss_growth_mb"] = round(rss_mb() - rss, 1)
        counts = store.sweep_counts(ctx.engine, store.get_sweep_by_id(ctx.engine, sweep.id))
        result["rows"] = {"ok": counts.ok, "failed": counts.failed, "missing": counts.missing}
        ctx.engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--sqlite", action="store_true", help="a temporary SQLite file instead of Postgres")
    args = parser.parse_args()
    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(f"sqlite:///{tmp}/bench.db", args.requests)
    else:
        with postgres_database() as url:
            result = run(url, args.requests)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
