"""Headroom benchmark (issue 14): the `limited` sweep of bench/throughput.py against each of the
simulated server's provider models (`localapi --limit-model`), 3,000 RPM, 500 ms latency.

Ideal wall time (a client with perfect knowledge of the server's rule, sending as fast as it
likes), from the first request to the last row:

* token-bucket (a minute's bucket, full at start, refilled at RPM/60 per s):
  (N - RPM) / (RPM/60) + one latency = 120.5 s for 9,000 requests;
* per-second (RPM/60 per calendar second) and window (the default): N / (RPM/60) = 180 s.

One command per row (each ~2-3 min; Redis db `BENCH_REDIS_DB`, flushed before and after):

    python bench/headroom.py --model token-bucket --procs 4
    python bench/headroom.py --model token-bucket --procs 1
    python bench/headroom.py --model per-second --procs 4
    python bench/headroom.py --model per-second --procs 1
    python bench/headroom.py --model token-bucket --procs 4 --no-headroom   # the previous pacing

The sweep, workers, databases and CPU accounting are bench/throughput.py's (`run("limited", ...)`);
this script only picks the server's model and the worker's GRIDTUNE_HEADROOM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import throughput  # noqa: E402
from bench.common import LocalAPI, md_table  # noqa: E402

LATENCY_S = 0.5
MODELS = ("token-bucket", "per-second", "window")


def ideal_seconds(model: str, requests: int, rpm: int = throughput.RPM) -> float:
    """First request to last row for a client that knows the server's rule."""
    rate = rpm / 60
    if model == "token-bucket":
        return max(0, requests - rpm) / rate + LATENCY_S
    return requests / rate


def run(model: str, procs: int, concurrency_total: int, requests: int, max_seconds: float, headroom: bool) -> dict:
    # throughput.run starts `LocalAPI("--rpm", ..., "--latency-ms", "500")`; add the model to it.
    throughput.LocalAPI = lambda *args: LocalAPI(*args, "--limit-model", model)
    os.environ["GRIDTUNE_HEADROOM"] = "1" if headroom else "0"
    result = throughput.run("limited", procs, concurrency_total, requests, max_seconds, [], None)
    ideal = ideal_seconds(model, requests)
    result.update(
        model=model, headroom=headroom, ideal_s=ideal,
        fraction_of_ideal_rows=ideal / result["first_start_to_last_row_s"],
        fraction_of_ideal_e2e=ideal / result["enqueue_to_final_s"],
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--concurrency-total", type=int, default=64)
    parser.add_argument("--requests", type=int, default=9_000)
    parser.add_argument("--max-seconds", type=float, default=420)
    parser.add_argument("--headroom", action=argparse.BooleanOptionalAction, default=True,
                        help="GRIDTUNE_HEADROOM for the workers (--no-headroom: the nominal rate only)")
    parser.add_argument("--json", help="also write the full result here")
    args = parser.parse_args()
    r = run(args.model, args.procs, args.concurrency_total, args.requests, args.max_seconds, args.headroom)
    print(json.dumps(r), file=sys.stderr, flush=True)
    server = r["server"]
    print(md_table(
        ["server model", "headroom", "procs x threads", "rows", "first start→last row s", "ideal s",
         "ideal/actual (rows)", "ideal/actual (e2e)", "429 share", "busiest 60 s", "worker CPU ms/request"],
        [[args.model, "on" if args.headroom else "off", f"{r['procs']}x{r['concurrency']}", r["rows"],
          r["first_start_to_last_row_s"], r["ideal_s"], r["fraction_of_ideal_rows"], r["fraction_of_ideal_e2e"],
          f"{100 * r['share_429']:.2f}% ({server['rate_limited']} of {server['requests']})",
          server["max_requests_per_60s"], r["worker_cpu_ms_per_request"]]],
    ))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
