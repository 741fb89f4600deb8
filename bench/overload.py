"""Servers that queue instead of refusing: the shared in-flight limit against an overloaded server.

* `sim`: localapi's overload mode (`--overload-capacity C --latency-ms L`: C requests at full
  speed, beyond that everyone slows down; nothing is refused). Full throughput = C / L.
* `serve`: any OpenAI-compatible server already running (`--base-url`, `--model`), e.g.
  `transformers serve` with SmolLM2-135M on this CPU; a sweep of the superhero-local prompts.

Each mode runs one sweep on real `celery -A worker worker` processes (Redis db `BENCH_REDIS_DB`,
a fresh Postgres database, fine-tune backend none): `adaptive` (the default settings), `none`
(GRIDTUNE_ADAPTIVE_IN_FLIGHT=0: every thread sends at once) and `fixed:K` (that off, and
GRIDTUNE_MAX_IN_FLIGHT=K). Reported from the rows: throughput (first request started -> last row),
p50/p90 latency (the answered attempt), attempts, timeouts and failed rows.

    python bench/overload.py sim --modes adaptive,none,fixed:16
    python bench/overload.py serve --base-url http://127.0.0.1:8000/v1 --model /path/to/smollm2-135m \\
        --requests 32 --procs 1 --concurrency-total 32 --modes adaptive,fixed:1,fixed:2,fixed:4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import PYTHON, ROOT, LocalAPI, bench_env, flush_redis, md_table, postgres_database  # noqa: E402
from bench.throughput import start_workers, stop_workers  # noqa: E402

SUPERHERO_PROMPT = ("Imagine a complete and detailed description of a {age}-year-old {gender} fictional character "
                    "who has the superpower of {power}. Write out the entire description in a maximum of 100 words "
                    "in great detail:")


def sim_toml(requests: int) -> str:
    return f"""name = "overload"
[dimensions]
n = {json.dumps(list(range(requests)))}
[templates]
prompt = "Describe a fictional character number {{n}} in at most 30 words:"
input = "{{n}}"
[model]
name = "gpt-4o-mini"
max_output_tokens = 100
[dataset]
min_examples = 1
[finetune]
backend = "none"
"""


def serve_toml(requests: int, model: str) -> str:
    ages = [18, 20, 30, 40, 50, 60, 90, 25, 35, 45, 55, 70, 80, 15, 22, 33]
    ages = ages[:max(1, min(len(ages), -(-requests // 2)))]  # 2 genders: about `requests` in all
    return f"""name = "overload"
repeats = {max(1, -(-requests // (len(ages) * 2)))}
[dimensions]
age = {json.dumps(ages)}
gender = ["man", "woman"]
power = ["flight"]
[templates]
prompt = "{SUPERHERO_PROMPT}"
input = "{{age}}, {{gender}}, {{power}}"
[model]
name = {json.dumps(model)}
temperature = 1.0
max_output_tokens = 200
stop = ["\\n\\n"]
token_param = "max_tokens"
[dataset]
min_examples = 1
[finetune]
backend = "none"
"""


def mode_env(mode: str) -> dict[str, str]:
    if mode == "adaptive":
        return {}
    if mode == "none":
        return {"GRIDTUNE_ADAPTIVE_IN_FLIGHT": "0"}
    if mode.startswith("fixed:"):
        return {"GRIDTUNE_ADAPTIVE_IN_FLIGHT": "0", "GRIDTUNE_MAX_IN_FLIGHT": mode.split(":", 1)[1]}
    raise SystemExit(f"unknown mode {mode!r}: adaptive, none or fixed:K")


def run(mode: str, toml: str, base_url: str, procs: int, total_conc: int, max_seconds: float,
        expected: int | None) -> dict:
    flush_redis()
    conc = max(1, total_conc // procs)
    with postgres_database() as db_url, tempfile.TemporaryDirectory(prefix="gridtune-bench-ov-") as tmp:
        env = bench_env(DATABASE_URL=db_url, OPENAI_API_KEY="sk-bench-local", OPENAI_BASE_URL=base_url,
                        GRIDTUNE_WORKER_CONCURRENCY=str(conc), GRIDTUNE_DATA_DIR=str(Path(tmp) / "data"),
                        **mode_env(mode))
        workers = start_workers(procs, conc, env, Path(tmp), [])
        try:
            cfg = Path(tmp) / "overload.toml"
            cfg.write_text(toml)
            enq = subprocess.run([PYTHON, "-m", "producer", "sweep", "--config", str(cfg), "--name", "overload"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            if enq.returncode:
                raise RuntimeError(enq.stderr[-2000:])
            import psycopg

            pg = psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True)
            deadline = time.monotonic() + max_seconds
            state = "running"
            while time.monotonic() < deadline:
                state = pg.execute("select state from sweeps where name='overload'").fetchone()[0]
                if state in ("dataset_ready", "done", "failed"):
                    break
                time.sleep(0.5)
            rows = pg.execute(
                "select state, error_kind, attempts, latency_ms, extract(epoch from started_at), "
                "extract(epoch from finished_at) from generations").fetchall()
            pg.close()
        finally:
            stop_workers(workers)
            flush_redis()
    ok = [r for r in rows if r[0] == "ok"]
    latencies = sorted(float(r[3]) for r in ok if r[3] is not None)
    first = min((float(r[4]) for r in rows if r[4] is not None), default=float("nan"))
    last = max((float(r[5]) for r in rows), default=float("nan"))
    wall = last - first
    return dict(
        mode=mode, procs=procs, concurrency=conc, rows=len(rows), ok=len(ok), final_state=state,
        failed=len(rows) - len(ok), timeouts_failed=sum(1 for r in rows if r[1] == "timeout"),
        attempts=sum(int(r[2] or 0) for r in rows), wall_s=wall,
        rows_per_min=60 * len(ok) / wall if wall > 0 else float("nan"),
        p50_latency_s=statistics.median(latencies) / 1000 if latencies else float("nan"),
        p90_latency_s=latencies[int(0.9 * (len(latencies) - 1))] / 1000 if latencies else float("nan"),
        expected=expected,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["sim", "serve"])
    parser.add_argument("--modes", default="adaptive,none")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--concurrency-total", type=int, default=64)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--capacity", type=int, default=16, help="sim: requests served at full speed at once")
    parser.add_argument("--latency-ms", type=float, default=500, help="sim: the unloaded latency")
    parser.add_argument("--base-url", help="serve: the server's /v1 URL")
    parser.add_argument("--model", help="serve: the model name the server knows")
    parser.add_argument("--max-seconds", type=float, default=600, help="per mode")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    for mode in args.modes.split(","):
        if args.scenario == "sim":
            requests = args.requests or 2000
            api = LocalAPI("--latency-ms", str(args.latency_ms), "--overload-capacity", str(args.capacity))
            try:
                r = run(mode, sim_toml(requests), api.base_url, args.procs, args.concurrency_total,
                        args.max_seconds, requests)
                r["server_max_in_flight"] = api.stats()["overload"]["max_in_flight"]
                r["server_requests"] = api.stats()["requests"]
            finally:
                api.stop()
            r["full_rows_per_min"] = 60 * args.capacity / (args.latency_ms / 1000)
            r["p50_over_unloaded"] = r["p50_latency_s"] / (args.latency_ms / 1000)
        else:
            if not (args.base_url and args.model):
                parser.error("serve needs --base-url and --model")
            requests = args.requests or 32
            r = run(mode, serve_toml(requests, args.model), args.base_url, args.procs, args.concurrency_total,
                    args.max_seconds, requests)
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
    headers = ["mode", "procs x threads", "rows ok / all", "wall s", "rows/min", "p50 latency s", "p90 latency s",
               "attempts", "timed-out rows"]
    table = [[r["mode"], f"{r['procs']}x{r['concurrency']}", f"{r['ok']} / {r['rows']}", r["wall_s"], r["rows_per_min"],
              r["p50_latency_s"], r["p90_latency_s"], r["attempts"], r["timeouts_failed"]] for r in results]
    if args.scenario == "sim":
        headers += ["of full throughput", "p50 / unloaded", "server max in flight"]
        for row, r in zip(table, results):
            row += [r["rows_per_min"] / r["full_rows_per_min"], r["p50_over_unloaded"], r["server_max_in_flight"]]
    print(md_table(headers, table))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
