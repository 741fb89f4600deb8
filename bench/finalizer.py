"""Finalizer benchmark: `finalize_sweep` (which streams rows into `write_dataset`) over 100k ok rows.

The dataset report (report.json, datasets.report) is part of what is timed; the one-time import
of datasketch (numpy, scipy) is measured apart (import s / import MB).

Rows are synthetic (unique responses of ~40 words) and inserted with one executemany; then the
finalizer runs in a fresh subprocess per database (SQLite file, fresh Postgres database) so that
ru_maxrss is its own. A second subprocess measures the tracemalloc peak (tracemalloc slows it).

    python bench/finalizer.py [--rows 100000] [--dbs sqlite,postgres] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PYTHON, ROOT, bench_env, md_table, postgres_database, sweep_toml  # noqa: E402

WORDS = ("brave quiet clever tall short ancient young swift gentle fierce loyal curious bright "
         "silent stubborn kind reckless patient proud humble").split()


def dims_for(rows: int) -> list[int]:
    return {100_000: [100, 100, 10], 10_000: [100, 100], 1_000: [10, 100]}[rows]


def populate(url: str, rows: int) -> tuple[int, float]:
    from sqlalchemy import insert

    from gridtune.sweep import parse_config, request_at
    from models import get_engine, store
    from models.schema import Generation, utcnow

    config = parse_config(sweep_toml(dims_for(rows)))
    engine = get_engine(url)
    sweep, _ = store.create_or_resume_sweep(engine, "bench-finalize", config)
    rng = random.Random(0)
    now = utcnow()
    t0 = time.perf_counter()
    batch = []
    with engine.begin() as conn:
        for i in range(rows):
            req = request_at(config, i)
            text = f"Character {i}: " + " ".join(rng.choice(WORDS) for _ in range(40)) + "."
            batch.append(dict(sweep_id=sweep.id, request_index=i, repeat=req.repeat, params=req.params,
                              prompt=req.prompt, input_text=req.input_text, response_text=text,
                              finish_reason="stop", model="gpt-4o-mini", prompt_tokens=30,
                              completion_tokens=60, latency_ms=1.0, attempts=1, rate_limited=0,
                              state="ok", started_at=now, finished_at=now))
            if len(batch) == 10_000:
                conn.execute(insert(Generation), batch)
                batch = []
        if batch:
            conn.execute(insert(Generation), batch)
    return sweep.id, time.perf_counter() - t0


def child(url: str, sweep_id: int, out_dir: str, trace: bool) -> dict:
    from gridtune.settings import Settings
    from models import get_engine, store
    from worker.context import WorkerContext
    from worker.dataset import finalize_sweep
    import worker.tokens  # noqa: F401  (bpe tables load on import: not finalizer cost)

    # datasketch (and the numpy/scipy it imports) loads once per worker process: measured apart.
    rss_before_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_import = time.perf_counter()
    import datasketch  # noqa: F401
    import_s = time.perf_counter() - t_import
    import_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_import) / 1024
    from worker.tokens import count_messages

    count_messages([{"role": "user", "content": "warm up"}], "o200k_base")
    ctx = WorkerContext(Settings(database_url=url, data_dir=Path(out_dir)))
    get_engine(url)
    if trace:
        import tracemalloc

        tracemalloc.start()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = finalize_sweep(ctx, sweep_id)
    elapsed = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = None
    if trace:
        import tracemalloc

        peak = tracemalloc.get_traced_memory()[1] / 2**20
    sweep = store.get_sweep_by_id(ctx.engine, sweep_id)
    return dict(state=result.state, seconds=elapsed, maxrss_delta_mb=(rss1 - rss0) / 1024,
                import_s=import_s, import_mb=import_mb,
                maxrss_mb=rss1 / 1024, tracemalloc_peak_mb=peak, sweep_state=sweep.state)


def reset_sweep(url: str, sweep_id: int) -> None:
    from sqlalchemy import delete, update

    from models import get_engine, session_scope
    from models.schema import Dataset, Sweep

    with session_scope(get_engine(url)) as s:
        s.execute(delete(Dataset).where(Dataset.sweep_id == sweep_id))
        s.execute(update(Sweep).where(Sweep.id == sweep_id).values(state="running", finalizer_runs=0))


def run_db(kind: str, url: str, rows: int, trace: bool) -> dict:
    from models import dispose_engines

    sweep_id, insert_s = populate(url, rows)
    dispose_engines()
    out = {"db": kind, "rows": rows, "insert_s": insert_s}
    with tempfile.TemporaryDirectory(prefix="gridtune-bench-ds-") as out_dir:
        modes = [False, True] if trace else [False]
        for tr in modes:
            reset_sweep(url, sweep_id)
            dispose_engines()
            args = [PYTHON, str(Path(__file__).resolve()), "--child", url, str(sweep_id), out_dir] + (["--tracemalloc"] if tr else [])
            p = subprocess.run(args, env=bench_env(), cwd=ROOT, capture_output=True, text=True, timeout=1200)
            if p.returncode:
                raise RuntimeError(p.stderr[-3000:])
            r = json.loads(p.stdout.strip().splitlines()[-1])
            if tr:
                out["tracemalloc_peak_mb"] = r["tracemalloc_peak_mb"]
                out["seconds_traced"] = r["seconds"]
            else:
                out.update(r)
                train = Path(out_dir) / "bench-finalize" / "train.jsonl"
                out["train_lines"] = sum(1 for _ in open(train)) if train.exists() else 0
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dbs", default="sqlite,postgres")
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        url, sweep_id, out_dir = args.child
        print(json.dumps(child(url, int(sweep_id), out_dir, args.tracemalloc)))
        return
    results = []
    for kind in args.dbs.split(","):
        if kind == "sqlite":
            with tempfile.TemporaryDirectory(prefix="gridtune-bench-") as tmp:
                results.append(run_db(kind, f"sqlite:///{tmp}/bench.db", args.rows, not args.no_tracemalloc))
        else:
            with postgres_database() as url:
                results.append(run_db(kind, url, args.rows, not args.no_tracemalloc))
    rows = [[r["db"], r["rows"], r["insert_s"], r["seconds"], round(r["rows"] / r["seconds"]),
             r["maxrss_delta_mb"], "-" if r.get("tracemalloc_peak_mb") is None else round(r["tracemalloc_peak_mb"], 1),
             r["train_lines"], r["state"], round(r["import_s"], 1), round(r["import_mb"], 1)] for r in results]
    print(md_table(["db", "rows", "insert s (executemany)", "finalize s", "rows/s", "ru_maxrss delta MB",
                    "tracemalloc peak MB", "train lines", "result", "import s", "import MB"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
