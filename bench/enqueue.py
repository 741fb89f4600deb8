"""Enqueue benchmark: `producer.enqueue.enqueue_sweep` at 10k and 100k requests vs Celery's naive chord.

Each measurement runs in a fresh subprocess (clean ru_maxrss). No worker runs: tasks sit in the
queue of the dedicated Redis db (BENCH_REDIS_DB, default 9), which is flushed before and after.
The database is a temporary SQLite file.

    python bench/enqueue.py [--sizes 10000,100000] [--naive 10000] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PYTHON, ROOT, bench_env, flush_redis, md_table, redis_used_memory, sweep_toml  # noqa: E402

DIMS = {10_000: [100, 100], 100_000: [100, 100, 10], 1_000: [10, 100]}


def child(n: int, mode: str, trace: bool) -> dict:
    from gridtune.sweep import parse_config
    from models import get_engine
    from models import store
    from worker.app import app

    config = parse_config(sweep_toml(DIMS[n]))
    engine = get_engine(os.environ["DATABASE_URL"])
    # warm up connections (broker, backend) outside the timed part
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
    app.backend.client.ping()
    import producer.enqueue  # noqa: F401  (imports worker.tasks -> openai, bpe_openai: not enqueue cost)
    import worker.tasks  # noqa: F401
    from celery import chord, group  # imported before the clock starts
    import gc

    gc.collect()
    if trace:
        import tracemalloc

        tracemalloc.start()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mem0 = redis_used_memory()
    t0 = time.perf_counter()
    if mode == "fast":
        from producer.enqueue import enqueue_sweep

        result = enqueue_sweep(app, engine, f"bench-{n}", config)
        sent = result.sent
    else:
        from worker.tasks import finalize, generate

        sweep, _ = store.create_or_resume_sweep(engine, f"bench-{n}", config)
        store.mark_enqueued(engine, sweep.id)
        chord(group(generate.s(sweep.id, i) for i in range(n)), finalize.si(sweep.id)).apply_async()
        sent = n
    elapsed = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = None
    if trace:
        import tracemalloc

        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    import redis

    r = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    queued = r.llen("gridtune")
    return dict(
        n=n, mode=mode, sent=sent, queued=queued, seconds=elapsed, tasks_per_s=sent / elapsed,
        maxrss_delta_mb=(rss1 - rss0) / 1024, maxrss_mb=rss1 / 1024,
        tracemalloc_peak_mb=(peak / 2**20) if peak is not None else None,
        redis_bytes_per_task=(redis_used_memory() - mem0) / max(sent, 1),
    )


def run_one(n: int, mode: str, trace: bool) -> dict:
    flush_redis()
    with tempfile.TemporaryDirectory(prefix="gridtune-bench-") as tmp:
        env = bench_env(DATABASE_URL=f"sqlite:///{tmp}/bench.db")
        args = [PYTHON, str(Path(__file__).resolve()), "--child", str(n), mode] + (["--tracemalloc"] if trace else [])
        out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    flush_redis()
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--naive", default="10000", help="sizes for the naive chord baseline ('' = none)")
    parser.add_argument("--tracemalloc", action="store_true", help="also a tracemalloc run per size (slower)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.tracemalloc)))
        return
    results = []
    for mode, sizes in (("fast", args.sizes), ("naive", args.naive)):
        for n in [int(s) for s in sizes.split(",") if s]:
            results.append(run_one(n, mode, False))
            if args.tracemalloc:  # a separate run: tracing slows the timed one down
                results[-1]["tracemalloc_peak_mb"] = run_one(n, mode, True)["tracemalloc_peak_mb"]
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    rows = []
    fast = {r["n"]: r for r in results if r["mode"] == "fast"}
    for r in results:
        ratio = ""
        if r["mode"] == "naive" and r["n"] in fast:
            ratio = f"fast is {fast[r['n']]['tasks_per_s'] / r['tasks_per_s']:.1f}x"
        tm = r.get("tracemalloc_peak_mb")
        rows.append([
            "enqueue_sweep (send_chord)" if r["mode"] == "fast" else "naive chord(group).apply_async",
            r["n"], r["seconds"], round(r["tasks_per_s"]), r["maxrss_delta_mb"],
            "-" if tm is None else round(tm, 1), round(r["redis_bytes_per_task"]), r["queued"], ratio,
        ])
    print(md_table(["path", "tasks", "wall s", "tasks/s", "ru_maxrss delta MB", "tracemalloc peak MB",
                    "Redis bytes/task", "queued", "ratio"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
