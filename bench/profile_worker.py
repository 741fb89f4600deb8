"""Profile one worker's path in-process: `run_request` serially against localapi (no limit, no
latency) on a fresh Postgres database; counts SQL statements, pool checkouts and Redis commands per
request (a pipeline counts once), and prints the top cProfile entries. It runs the `generate` task
body (run_request with its in-flight entry) without Celery: Celery's own per-task cost is not in it (see
`throughput.py ceiling --py-spy`).

    python bench/profile_worker.py [--n 300]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REDIS_URL, LocalAPI, flush_redis, postgres_database, sweep_toml  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    flush_redis()
    api = LocalAPI("--latency-ms", "0")
    try:
        with postgres_database() as url:
            os.environ.update(DATABASE_URL=url, CELERY_BROKER_URL=REDIS_URL, GRIDTUNE_REDIS_URL=REDIS_URL,
                              OPENAI_API_KEY="sk-bench-local", OPENAI_BASE_URL=api.base_url)
            from sqlalchemy import event

            import redis
            from gridtune.settings import get_settings
            from gridtune.sweep import parse_config
            from models import store
            from worker.context import InFlightEntry, get_context
            from worker.generation import run_request

            ctx = get_context()
            config = parse_config(sweep_toml([20, 20, 10]))
            sweep, _ = store.create_or_resume_sweep(ctx.engine, "prof", config)
            sql, checkouts, rcmds = Counter(), Counter(), Counter()
            event.listen(ctx.engine, "before_cursor_execute",
                         lambda conn, cur, stmt, *a: sql.update([stmt.split()[0].upper()]))
            event.listen(ctx.engine.pool, "checkout", lambda *a: checkouts.update(["checkout"]))
            orig = redis.Redis.execute_command

            def counting(self, *a, **k):
                rcmds.update([str(a[0]).upper()])
                return orig(self, *a, **k)

            redis.Redis.execute_command = counting
            orig_pipe = redis.client.Pipeline.execute

            def counting_pipe(self, *a, **k):  # one round trip, whatever it holds
                rcmds.update(["PIPELINE(" + "+".join(str(c[0][0]).upper() for c in self.command_stack) + ")"])
                return orig_pipe(self, *a, **k)

            redis.client.Pipeline.execute = counting_pipe
            run_request(ctx, sweep.id, 0)  # warm-up (client, scripts, configure)
            sql.clear(); checkouts.clear(); rcmds.clear()
            prof = cProfile.Profile()
            t0 = time.perf_counter(); c0 = time.process_time()
            prof.enable()
            for i in range(1, args.n + 1):
                entry = InFlightEntry(sweep.id, f"t{i}")
                run_request(ctx, sweep.id, i, entry=entry)
                entry.close(ctx.redis)
            prof.disable()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = args.n
            print(f"serial: {n} requests, {1000 * wall / n:.2f} ms wall/request, {1000 * cpu / n:.2f} ms CPU/request "
                  f"(under cProfile)")
            print("SQL statements/request:", {k: round(v / n, 2) for k, v in sql.items()}, "total", round(sum(sql.values()) / n, 2))
            print("pool checkouts/request:", round(checkouts["checkout"] / n, 2))
            print("Redis round trips/request:", {k: round(v / n, 2) for k, v in rcmds.items()}, "total", round(sum(rcmds.values()) / n, 2))
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
            print(s.getvalue())
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())
            _ = get_settings
    finally:
        api.stop()
        flush_redis()


if __name__ == "__main__":
    main()
