"""Worker throughput benchmark: a real sweep on N `celery -A worker worker` processes (threads pool).

Two scenarios (both: Redis broker/backend/limiter on the dedicated db, a fresh Postgres database
per run, localapi on 127.0.0.1, fine-tune backend none):

* `limited`: localapi --rpm 3000 --latency-ms 500, 9,000 requests (30 x 30 x 10). Ideal wall =
  9000 / (3000/60) = 180 s. Reports achieved/ideal, the 429 share, the server's busiest 60 s.
* `ceiling`: localapi without limits, --latency-ms 0: rows/s the worker path can write.

Runs are bounded (`--max-seconds`): a run that does not finish in time reports the rate over
the rows it did write. Worker CPU comes from /proc/<pid>/stat (user+sys of each worker process);
Redis and Postgres CPU are whole-server deltas (INFO cpu; postmaster + backends). e2e = start-up
(enqueue start -> first request started) + first->last row + tail (last row -> sweep done).
`--py-spy SECONDS` also samples worker 0 (`py-spy record --gil`) and splits its CPU by component;
`--strace SECONDS` counts worker 0's system calls (`strace -c -f`, every thread) with the rows
written in that window (`strace_rows`, `strace_file` in the JSON).

    python bench/throughput.py limited --procs 1,4 --concurrency-total 64
    python bench/throughput.py ceiling --procs 1,4 --requests 20000 --concurrency-total 64 --max-seconds 60
    python bench/throughput.py ceiling --procs 1 --requests 4000 --max-seconds 60 --py-spy 40
    python bench/throughput.py ceiling --procs 1 --requests 4000 --concurrency-total 16 --max-seconds 60 --strace 15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    PYTHON, ROOT, LocalAPI, bench_env, flush_redis, md_table, postgres_database,
    proc_cpu_seconds, server_cpu_seconds, sweep_toml,
)

RPM = 3000
PY_SPY = str(Path(PYTHON).parent / "py-spy") if (Path(PYTHON).parent / "py-spy").exists() else "py-spy"


def dims_for(n: int) -> list[int]:
    return {9_000: [30, 30, 10], 20_000: [100, 20, 10], 2_000: [20, 10, 10], 4_000: [20, 20, 10],
            50_000: [100, 50, 10]}[n]


def start_workers(procs: int, concurrency: int, env: dict, logdir: Path, extra: list[str],
                  cwd: str | Path = ROOT, app: str = "worker") -> list[subprocess.Popen]:
    workers = []
    for i in range(procs):
        log = open(logdir / f"worker{i}.log", "w")
        # celery patches for gevent/eventlet from the first --pool on the command line: one only
        pool = [] if any(a.startswith(("--pool", "-P")) for a in extra) else ["--pool", "threads"]
        cmd = [PYTHON, "-m", "celery", "-A", app, "worker", *pool, "-c", str(concurrency),
               "-Q", "gridtune", "-n", f"bench{i}@%h", "--without-gossip", "--without-mingle",
               "--without-heartbeat", "-l", "INFO", *extra]
        workers.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
    deadline = time.monotonic() + 90
    for i in range(procs):
        while time.monotonic() < deadline:
            if "ready." in (logdir / f"worker{i}.log").read_text():
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"worker {i} did not start: {(logdir / f'worker{i}.log').read_text()[-2000:]}")
    return workers


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def run(scenario: str, procs: int, total_conc: int, requests: int, max_seconds: float,
        worker_args: list[str], pythonpath: str | None, py_spy: float = 0, strace: float = 0) -> dict:
    flush_redis()
    if scenario == "limited":
        api = LocalAPI("--rpm", str(RPM), "--latency-ms", "500")
        toml = sweep_toml(dims_for(requests), rpm=RPM)
    else:
        api = LocalAPI("--latency-ms", "0")
        toml = sweep_toml(dims_for(requests))
    conc = max(1, total_conc // procs)
    try:
        with postgres_database() as db_url, tempfile.TemporaryDirectory(prefix="gridtune-bench-tp-") as tmp:
            env = bench_env(
                DATABASE_URL=db_url, OPENAI_API_KEY="sk-bench-local", OPENAI_BASE_URL=api.base_url,
                GRIDTUNE_WORKER_CONCURRENCY=str(conc), GRIDTUNE_DATA_DIR=str(Path(tmp) / "data"),
            )
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            os.environ.update({k: env[k] for k in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
                                                    "GRIDTUNE_REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                                                    "GRIDTUNE_DATA_DIR")})
            # `python -m` puts the cwd first on sys.path: run from the tree under test
            tree = pythonpath or ROOT
            workers = start_workers(procs, conc, env, Path(tmp), worker_args, cwd=tree)
            cpu0 = {w.pid: proc_cpu_seconds(w.pid) for w in workers}
            api_cpu0 = api.cpu_seconds()
            srv0 = server_cpu_seconds()
            # enqueue in a subprocess (the same code the CLI runs)
            cfg = Path(tmp) / "bench.toml"
            cfg.write_text(toml)
            t_enqueue = time.time()
            enq = subprocess.run([PYTHON, "-m", "producer", "sweep", "--config", str(cfg), "--name", "bench"], env=env,
                                 cwd=tree, capture_output=True, text=True, timeout=600)
            t_enqueued = time.time()
            if enq.returncode:
                raise RuntimeError(enq.stderr[-2000:])
            import psycopg

            keep = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/gridtune-bench-logs"))
            keep.mkdir(parents=True, exist_ok=True)
            spy = spy_out = None
            if py_spy:
                # samples only the thread holding the GIL: where worker 0's CPU goes
                spy_out = keep / f"pyspy-{scenario}-{procs}procs.txt"
                spy = subprocess.Popen([PY_SPY, "record", "--pid", str(workers[0].pid), "--gil", "--nonblocking",
                                        "--rate", "100", "--duration", str(int(py_spy)), "--format", "raw",
                                        "--output", str(spy_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pg = psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True)
            def rows_written() -> int:
                return pg.execute("select count(*) from generations").fetchone()[0]

            tracer = trace_out = traced_rows = None
            if strace:
                # syscalls of every thread of worker 0 over a window, per row written in it
                trace_out = keep / f"strace-{scenario}-{procs}procs.txt"
                tids = [f"-p{t}" for t in os.listdir(f"/proc/{workers[0].pid}/task")]
                tracer = subprocess.Popen(["timeout", "-s", "INT", str(int(strace)), "strace", "-c", "-f", "-q",
                                           "-o", str(trace_out), *tids],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                traced_from = rows_written()
            deadline = time.monotonic() + max_seconds
            state, done = "running", 0
            t_final = None
            while time.monotonic() < deadline:
                done = rows_written()
                state = pg.execute("select state from sweeps where name='bench'").fetchone()[0]
                if state in ("dataset_ready", "done", "failed"):
                    t_final = time.time()
                    break
                if tracer is not None and traced_rows is None and tracer.poll() is not None:
                    traced_rows = rows_written() - traced_from
                time.sleep(0.5)
            if tracer is not None and traced_rows is None:
                tracer.wait()
                traced_rows = rows_written() - traced_from
            cpu = sum(proc_cpu_seconds(w.pid) - cpu0[w.pid] for w in workers)
            api_cpu = api.cpu_seconds() - api_cpu0
            srv = {k: v - srv0[k] for k, v in server_cpu_seconds().items()}
            stats = api.stats()
            # rows, first and last from one query (the poll's count can lag the window by a few rows)
            first, last, ok, attempts, limited_rows, done = pg.execute(
                "select extract(epoch from min(finished_at)), extract(epoch from max(finished_at)), "
                "count(*) filter (where state='ok'), coalesce(sum(attempts),0), coalesce(sum(rate_limited),0), "
                "count(*) from generations").fetchone()
            ss = pg.execute("select extract(epoch from min(started_at)) from generations").fetchone()[0]
            pg.close()
            if spy is not None:
                try:
                    spy.wait(max(10, py_spy + 30))
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
            stop_workers(workers)
            logs = "".join((Path(tmp) / f"worker{i}.log").read_text() for i in range(procs))
            (keep / f"{scenario}-{procs}procs.log").write_text(logs[-200_000:])
    finally:
        api.stop()
        flush_redis()
    rows_wall = (float(last) - float(first)) if first is not None else float("nan")
    e2e = (t_final - t_enqueue) if t_final else float("nan")
    out = dict(
        scenario=scenario, procs=procs, concurrency=conc, requests=requests, rows=done, ok=ok,
        finished=t_final is not None, final_state=state, enqueue_s=t_enqueued - t_enqueue,
        first_to_last_row_s=rows_wall, enqueue_to_final_s=e2e,
        rows_per_s=(done - 1) / rows_wall if rows_wall and rows_wall > 0 else float("nan"),
        first_start_to_last_row_s=(float(last) - float(ss)) if ss is not None else float("nan"),
        # e2e = start-up (CLI start, sweep creation, first messages) + rows + tail (chord body, dataset)
        enqueue_to_first_start_s=(float(ss) - t_enqueue) if ss is not None else float("nan"),
        last_row_to_final_s=(t_final - float(last)) if (t_final and last is not None) else float("nan"),
        worker_cpu_s=cpu, worker_cpu_ms_per_request=1000 * cpu / max(done, 1),
        server_cpu_ms_per_request=1000 * api_cpu / max(stats["requests"], 1),
        redis_cpu_ms_per_request=1000 * srv["redis"] / max(stats["requests"], 1),
        postgres_cpu_ms_per_request=1000 * srv["postgres"] / max(stats["requests"], 1),
        server=stats, retries_logged=logs.count("Retry in"),
        celery_retries=logs.count("retry: Retry"),
    )
    if trace_out is not None and trace_out.exists():
        # rows of the whole run in the window, divided by the processes: worker 0's share, roughly
        out["strace_rows"] = traced_rows / procs
        out["strace_file"] = str(trace_out)
    if spy_out is not None and spy_out.exists():
        from bench.pyspy_split import report

        out["py_spy_split_pct"] = report(spy_out)
    if scenario == "limited":
        ideal = requests / (RPM / 60)
        out["ideal_s"] = ideal
        # achieved rate / ideal rate (for a finished run: ideal wall / actual wall)
        out["fraction_of_ideal_rows"] = out["rows_per_s"] / (RPM / 60)
        out["fraction_of_ideal_e2e"] = ideal / e2e if e2e == e2e else float("nan")
        out["share_429"] = stats["rate_limited"] / max(stats["requests"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["limited", "ceiling"])
    parser.add_argument("--procs", default="1,4")
    parser.add_argument("--concurrency-total", type=int, default=64)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--max-seconds", type=float, default=420)
    parser.add_argument("--worker-arg", action="append", default=[], help="extra celery worker argument")
    parser.add_argument("--pythonpath", help="run workers and producer from another tree (scratch copy)")
    parser.add_argument("--py-spy", type=float, default=0, metavar="SECONDS",
                        help="also sample worker 0 with py-spy --gil for this long (adds CPU: separate run)")
    parser.add_argument("--strace", type=float, default=0, metavar="SECONDS",
                        help="also count worker 0's system calls with strace -c for this long (slows it: separate run)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.strace and not shutil.which("strace"):
        parser.error("--strace needs strace on the PATH (Debian: apt-get install strace)")
    requests = args.requests or (9_000 if args.scenario == "limited" else 20_000)
    results = []
    for procs in [int(p) for p in args.procs.split(",")]:
        r = run(args.scenario, procs, args.concurrency_total, requests, args.max_seconds, args.worker_arg,
                args.pythonpath, args.py_spy, args.strace)
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
    if args.scenario == "limited":
        rows = [[r["procs"], f"{r['procs']}x{r['concurrency']}", r["rows"], r["first_to_last_row_s"],
                 r["enqueue_to_final_s"], r["enqueue_to_first_start_s"], r["last_row_to_final_s"],
                 r["fraction_of_ideal_rows"], r["fraction_of_ideal_e2e"],
                 f"{100 * r['share_429']:.2f}%", f"{r['server']['max_requests_per_60s']} / {RPM}",
                 r["worker_cpu_ms_per_request"]] for r in results]
        print(md_table(["procs", "procs x threads", "rows", "first->last row s", "enqueue->dataset s",
                        "start-up s", "tail s", "ideal/actual (rows)", "ideal/actual (e2e)", "429 share", "max req/60s vs limit",
                        "worker CPU ms/request"], rows))
    else:
        rows = [[r["procs"], f"{r['procs']}x{r['concurrency']}", r["rows"], r["finished"], r["first_to_last_row_s"],
                 r["rows_per_s"], r["worker_cpu_ms_per_request"], r["server_cpu_ms_per_request"],
                 r["redis_cpu_ms_per_request"], r["postgres_cpu_ms_per_request"]] for r in results]
        print(md_table(["procs", "procs x threads", "rows", "finished", "first->last row s", "rows/s",
                        "worker CPU ms/row", "localapi CPU ms/request", "Redis CPU ms/request",
                        "Postgres CPU ms/request"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
