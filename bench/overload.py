"""Servers that queue instead of refusing: the shared in-flight limit against an overloaded server.

* `sim`: localapi's overload mode (`--overload-capacity C --latency-ms L`: C requests at full
  speed, beyond that everyone slows down; nothing is refused). Full throughput = C / L.
* `serve`: an OpenAI-compatible server, e.g. `transformers serve` with SmolLM2-135M on this CPU;
  a sweep of the superhero-local prompts. Either one already running (`--base-url`; `--model`
  defaults to the one model it lists at /v1/models), or `--start-server`: the script starts
  `transformers serve` on the model folder itself (the converted SmolLM2-135M by default), waits
  until it answers, sends one warm-up request (also the estimate of the run's length) and stops
  it at the end.

Each mode runs one sweep on real `celery -A worker worker` processes (Redis db `BENCH_REDIS_DB`,
a fresh Postgres database, fine-tune backend none): `adaptive` (the default settings), `none`
(GRIDTUNE_ADAPTIVE_IN_FLIGHT=0: every thread sends at once) and `fixed:K` (that off, and
GRIDTUNE_MAX_IN_FLIGHT=K). A mode ends when every request has its row (or the sweep stopped, or
after `--max-seconds`). Reported from the rows: throughput (first request started -> last row),
p50/p90 latency (the answered attempt, without the wait for an in-flight slot), attempts, timed-out
attempts (from the workers' logs) and failed rows; for `serve`, the best fixed cap and how adaptive
compares (issue 14: no timeout, throughput within 10 % of the best fixed cap).

    python bench/overload.py sim --modes adaptive,none,fixed:16
    BENCH_REDIS_DB=11 python bench/overload.py serve --start-server --log-dir /tmp/overload-logs
    python bench/overload.py serve --base-url http://127.0.0.1:8011/v1 --requests 4 --modes adaptive,fixed:2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
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


SERVE_POWERS = ["flight", "invisibility", "telepathy", "super strength"]
SERVE_AGES = [18, 20, 30, 40, 50, 60, 90, 25, 35, 45, 55, 70, 80, 15, 22, 33]


def serve_grid(requests: int) -> tuple[list[int], list[str], int]:
    """Ages, powers and repeats for about `requests` distinct prompts (2 genders); the server
    decodes greedily, so every mode generates the same answers: the same work in each."""
    powers = SERVE_POWERS[:max(1, min(len(SERVE_POWERS), -(-requests // (2 * len(SERVE_AGES)))))]
    ages = SERVE_AGES[:max(1, min(len(SERVE_AGES), -(-requests // (2 * len(powers)))))]
    return ages, powers, max(1, -(-requests // (len(ages) * 2 * len(powers))))


def serve_total(requests: int) -> int:
    ages, powers, repeats = serve_grid(requests)
    return len(ages) * 2 * len(powers) * repeats


def serve_toml(requests: int, model: str) -> str:
    ages, powers, repeats = serve_grid(requests)
    return f"""name = "overload"
repeats = {repeats}
[dimensions]
age = {json.dumps(ages)}
gender = ["man", "woman"]
power = {json.dumps(powers)}
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


FINAL_STATES = ("dataset_ready", "done", "failed")
TIMEOUT_LINE = ": timeout; retrying in"  # worker/generation.py's log line for a retried timeout


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (NaN for none)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def run(mode: str, toml: str, base_url: str, procs: int, total_conc: int, max_seconds: float,
        expected: int | None, log_dir: Path | None = None) -> dict:
    flush_redis()
    conc = max(1, total_conc // procs)
    began = time.monotonic()
    with postgres_database() as db_url, tempfile.TemporaryDirectory(prefix="gridtune-bench-ov-") as tmp:
        logs = Path(tmp)
        if log_dir is not None:
            logs = log_dir / mode.replace(":", "-")
            shutil.rmtree(logs, ignore_errors=True)
            logs.mkdir(parents=True)
        env = bench_env(DATABASE_URL=db_url, OPENAI_API_KEY="sk-bench-local", OPENAI_BASE_URL=base_url,
                        GRIDTUNE_WORKER_CONCURRENCY=str(conc), GRIDTUNE_DATA_DIR=str(Path(tmp) / "data"),
                        **mode_env(mode))
        workers = start_workers(procs, conc, env, logs, [])
        try:
            cfg = Path(tmp) / "overload.toml"
            cfg.write_text(toml)
            enq = subprocess.run([PYTHON, "-m", "producer", "sweep", "--config", str(cfg), "--name", "overload"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            if enq.returncode:
                raise RuntimeError(enq.stderr[-2000:])
            import psycopg

            pg = psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True)
            total = pg.execute("select total_requests from sweeps where name='overload'").fetchone()[0]
            deadline = time.monotonic() + max_seconds
            state, stored, shown = "running", 0, time.monotonic()
            # Every request's row is the measurement; the finalizer after it is not waited for.
            while time.monotonic() < deadline:
                state, stored = pg.execute(
                    "select state, (select count(*) from generations g where g.sweep_id = s.id) "
                    "from sweeps s where name='overload'").fetchone()
                if stored >= total or state in FINAL_STATES:
                    break
                if state == "stopped":  # the rest are stored as failed ("stopped") as their tasks run
                    deadline = min(deadline, time.monotonic() + 60)
                if time.monotonic() - shown >= 30:
                    print(f"  {mode}: {stored}/{total} rows after {time.monotonic() - began:.0f} s",
                          file=sys.stderr, flush=True)
                    shown = time.monotonic()
                time.sleep(1)
            complete = stored >= total
            stop_reason = pg.execute("select stop_reason from sweeps where name='overload'").fetchone()[0]
            rows = pg.execute(
                "select state, error_kind, attempts, latency_ms, extract(epoch from started_at), "
                "extract(epoch from finished_at), completion_tokens from generations").fetchall()
            pg.close()
        finally:
            stop_workers(workers)
            flush_redis()
        retried_timeouts = sum(f.read_text(errors="replace").count(TIMEOUT_LINE) for f in logs.glob("worker*.log"))
    ok = [r for r in rows if r[0] == "ok"]
    latencies = sorted(float(r[3]) / 1000 for r in ok if r[3] is not None)
    first = min((float(r[4]) for r in rows if r[4] is not None), default=float("nan"))
    last = max((float(r[5]) for r in rows), default=float("nan"))
    wall = last - first
    failed_kinds: dict[str, int] = {}
    for r in rows:
        if r[0] != "ok":
            failed_kinds[r[1] or "?"] = failed_kinds.get(r[1] or "?", 0) + 1
    timed_out_rows = failed_kinds.get("timeout", 0)
    tokens = sum(int(r[6] or 0) for r in ok)
    return dict(
        mode=mode, procs=procs, concurrency=conc, total=total, rows=len(rows), ok=len(ok), complete=complete,
        final_state=state, stop_reason=stop_reason, failed=len(rows) - len(ok), failed_kinds=failed_kinds,
        timeouts_failed=timed_out_rows, timeouts=retried_timeouts + timed_out_rows,
        attempts=sum(int(r[2] or 0) for r in rows), wall_s=wall, mode_s=time.monotonic() - began,
        rows_per_min=60 * len(ok) / wall if wall > 0 else float("nan"),
        tokens_per_s=tokens / wall if wall > 0 else float("nan"), completion_tokens=tokens,
        p50_latency_s=quantile(latencies, 0.5), p90_latency_s=quantile(latencies, 0.9),
        expected=expected,
        request_timeout_s=float(os.environ.get("GRIDTUNE_REQUEST_TIMEOUT") or 60),
    )


# --- transformers serve ---------------------------------------------------------------------------
def _http_json(url: str, body: dict | None = None, timeout: float = 5) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def server_models(base_url: str) -> list[str]:
    return [m["id"] for m in _http_json(base_url.rstrip("/") + "/models", timeout=10).get("data", [])]


def answers(base_url: str) -> bool:
    try:
        server_models(base_url)
        return True
    except (OSError, ValueError):
        return False


class TransformersServe:
    """`transformers serve` pinned to one model folder, in a process group of its own (it spawns
    the model's process); stop() ends the group."""

    def __init__(self, folder: Path, port: int, extra_args: list[str], log_path: Path, start_timeout: float):
        self.base_url = f"http://127.0.0.1:{port}/v1"
        if answers(self.base_url):
            raise SystemExit(f"something already answers at {self.base_url}: stop it or pick another --port")
        exe = Path(PYTHON).parent / "transformers"
        cli = [str(exe)] if exe.exists() else [shutil.which("transformers") or "transformers"]
        self.model = str(folder)  # the name it answers to: exactly as given on its command line
        self.cmd = [*cli, "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args, self.model]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log_path = log_path
        self.log = open(log_path, "w")
        print(f"starting: {shlex.join(self.cmd)} (log: {log_path})", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        began = time.monotonic()
        deadline = began + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"transformers serve exited ({self.proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                if self.model in server_models(self.base_url):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        else:
            self.stop()
            raise RuntimeError(f"transformers serve did not answer within {start_timeout:.0f} s: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        self.start_s = time.monotonic() - began

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        try:  # the model's process, if it outlived the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()


def probe(base_url: str, model: str, timeout: float = 300) -> dict:
    """One superhero request alone, as the sweep sends it: the unloaded latency and its tokens."""
    body = {"model": model, "temperature": 1.0, "max_tokens": 200, "stop": ["\n\n"],
            "messages": [{"role": "user", "content": SUPERHERO_PROMPT.format(age=30, gender="woman", power="flight")}]}
    began = time.monotonic()
    answer = _http_json(base_url.rstrip("/") + "/chat/completions", body, timeout=timeout)
    latency = time.monotonic() - began
    return {"latency_s": latency, "completion_tokens": (answer.get("usage") or {}).get("completion_tokens")}


SERVE_MODES = "fixed:1,fixed:2,fixed:3,fixed:4,fixed:6,adaptive,none"
MODE_OVERHEAD_S = 10  # worker start and stop, database, enqueue: per mode (6 s measured here, loaded)
# Mean answer of the superhero prompts at max 200 tokens, stop at the paragraph break (133 over the
# 294 rows of the first command's run, 142 over 4 smoke rows); the probe's prompt answers in ~77.
MEAN_ANSWER_TOKENS = 140


def serve_verdict(results: list[dict]) -> str:
    fixed = [r for r in results if r["mode"].startswith("fixed:") and r["complete"] and not r["failed"]]
    lines = []
    best = max(fixed, key=lambda r: r["rows_per_min"], default=None)
    if best:
        lines.append(f"best fixed cap: {best['mode']} at {best['rows_per_min']:.2f} rows/min")
    for r in results:
        if r["mode"] != "adaptive":
            continue
        ok_timeouts = r["timeouts"] == 0 and r["complete"] and not r["failed"]
        line = (f"adaptive: {r['timeouts']} timed-out attempts, {r['failed']} failed rows, "
                f"{r['ok']}/{r['total']} rows -> {'no timeout' if ok_timeouts else 'NOT clean'}")
        if best:
            ratio = r["rows_per_min"] / best["rows_per_min"]
            verdict = "within" if ratio >= 0.9 else "NOT within"
            line += f"; throughput {ratio:.3f} of the best fixed cap -> {verdict} 10 %"
        lines.append(line)
    for r in results:
        if r["mode"] == "none":
            lines.append(f"none: {r['timeouts']} timed-out attempts, {r['failed']} failed rows of {r['total']}"
                         + (f", stopped: {r['stop_reason']}" if r["stop_reason"] else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["sim", "serve"])
    parser.add_argument("--modes", help=f"default: sim adaptive,none; serve {SERVE_MODES}")
    parser.add_argument("--procs", type=int, help="worker processes (default: sim 4, serve 1)")
    parser.add_argument("--concurrency-total", type=int, help="threads over all processes (default: sim 64, serve 32)")
    parser.add_argument("--requests", type=int, help="default: sim 2000, serve 16")
    parser.add_argument("--capacity", type=int, default=16, help="sim: requests served at full speed at once")
    parser.add_argument("--latency-ms", type=float, default=500, help="sim: the unloaded latency")
    parser.add_argument("--base-url", help="serve: the server's /v1 URL (not with --start-server)")
    parser.add_argument("--model", help="serve: the model name the server knows (default: the one it lists)")
    parser.add_argument("--start-server", action="store_true",
                        help="serve: start `transformers serve` on --model-folder (and stop it at the end)")
    parser.add_argument("--model-folder", help="serve --start-server: a model folder (default: the converted "
                                               "smollm2-135m, converted now if needed)")
    parser.add_argument("--port", type=int, default=8011, help="serve --start-server: the server's port")
    parser.add_argument("--serve-args", default="--device cpu",
                        help="serve --start-server: more `transformers serve` flags, e.g. '--device cpu "
                             "--continuous-batching'")
    parser.add_argument("--server-start-timeout", type=float, default=300, help="seconds for it to answer")
    parser.add_argument("--max-seconds", type=float, default=600, help="per mode")
    parser.add_argument("--log-dir", type=Path, help="keep the workers' (and the server's) logs here")
    parser.add_argument("--json")
    args = parser.parse_args()
    serve = args.scenario == "serve"
    modes = (args.modes or (SERVE_MODES if serve else "adaptive,none")).split(",")
    for mode in modes:
        mode_env(mode)  # an unknown mode fails now, not after the server started
    procs = args.procs or (1 if serve else 4)
    total_conc = args.concurrency_total or (32 if serve else 64)
    requests = args.requests or (16 if serve else 2000)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    server = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its server and workers
    started = time.monotonic()
    results: list[dict] = []
    header = {}
    try:
        if serve:
            if args.start_server:
                if args.base_url:
                    parser.error("--start-server starts its own server: no --base-url")
                if args.model_folder:
                    folder = Path(args.model_folder).expanduser().resolve()
                else:
                    from gridtune.localmodel import resolve

                    folder = resolve("smollm2-135m")
                if not (folder / "config.json").is_file():
                    parser.error(f"{folder}: not a model folder (no config.json)")
                log_path = (args.log_dir or Path(tempfile.gettempdir())) / "transformers-serve.log"
                server = TransformersServe(folder, args.port, shlex.split(args.serve_args), log_path,
                                           args.server_start_timeout)
                base_url, model = server.base_url, server.model
                header.update(server_cmd=shlex.join(server.cmd), server_start_s=server.start_s)
            else:
                if not args.base_url:
                    parser.error("serve needs --base-url, or --start-server")
                base_url = args.base_url
                listed = server_models(base_url)
                model = args.model or (listed[0] if len(listed) == 1 else None)
                if model is None:
                    parser.error(f"the server lists {listed}: say which with --model")
                if model not in listed:
                    print(f"warning: {model!r} is not in the server's /v1/models {listed}",
                          file=sys.stderr)
            one = probe(base_url, model)  # also warms the server up before the first mode
            header.update(model=model, probe=one, requests=requests, modes=modes)
            total = serve_total(requests)
            per_request = one["latency_s"] * MEAN_ANSWER_TOKENS / max(1, one["completion_tokens"] or 1)
            estimate = len(modes) * (total * per_request + MODE_OVERHEAD_S)
            header["estimate_s"] = estimate
            print(f"probe: one request alone {one['latency_s']:.1f} s, {one['completion_tokens']} tokens; "
                  f"{len(modes)} modes x {total} requests: about {estimate / 60:.0f} min if the server runs one "
                  f"request at a time ({per_request:.1f} s each)", file=sys.stderr, flush=True)
        for mode in modes:
            if serve:
                r = run(mode, serve_toml(requests, model), base_url, procs, total_conc, args.max_seconds,
                        requests, args.log_dir)
            else:
                api = LocalAPI("--latency-ms", str(args.latency_ms), "--overload-capacity", str(args.capacity))
                try:
                    r = run(mode, sim_toml(requests), api.base_url, procs, total_conc, args.max_seconds,
                            requests, args.log_dir)
                    r["server_max_in_flight"] = api.stats()["overload"]["max_in_flight"]
                    r["server_requests"] = api.stats()["requests"]
                finally:
                    api.stop()
                r["full_rows_per_min"] = 60 * args.capacity / (args.latency_ms / 1000)
                r["p50_over_unloaded"] = r["p50_latency_s"] / (args.latency_ms / 1000)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
            if args.json:  # after every mode: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps({"run": header, "results": results}, indent=2))
    finally:
        if server is not None:
            server.stop()
    headers = ["mode", "procs x threads", "rows ok / all", "wall s", "rows/min", "p50 latency s", "p90 latency s",
               "attempts", "timed-out attempts", "failed rows"]
    table = [[r["mode"], f"{r['procs']}x{r['concurrency']}",
              f"{r['ok']} / {r['total']}" + ("" if r["complete"] else " (incomplete)"), r["wall_s"], r["rows_per_min"],
              r["p50_latency_s"], r["p90_latency_s"], r["attempts"], r["timeouts"],
              ", ".join(f"{n} {k}" for k, n in r["failed_kinds"].items()) or "0"] for r in results]
    if serve:
        headers.insert(5, "tokens/s")
        for row, r in zip(table, results):
            row.insert(5, r["tokens_per_s"])
    else:
        headers += ["of full throughput", "p50 / unloaded", "server max in flight"]
        for row, r in zip(table, results):
            row += [r["rows_per_min"] / r["full_rows_per_min"], r["p50_over_unloaded"], r["server_max_in_flight"]]
    print(md_table(headers, table))
    if serve:
        if header.get("probe"):
            print(f"\none request alone: {header['probe']['latency_s']:.1f} s, {header['probe']['completion_tokens']} "
                  f"tokens; request timeout {results[0]['request_timeout_s'] if results else '?'} s")
        print(serve_verdict(results))
    print(f"total {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
