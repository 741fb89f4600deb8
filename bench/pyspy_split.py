"""Split a `py-spy record --format raw --gil` profile (collapsed stacks) of a worker by component.

py-spy writes paths relative to sys.path (`celery/app/trace.py`, `worker/tasks.py`, `threading.py`).
A sample taken inside our task body (`worker/tasks.py` on the stack) is charged to the innermost
frame that is not the standard library: a socket read under redis-py counts as Redis, json under
openai as SDK/HTTP. A sample outside the task body is Celery's own per-task work (consuming the
message, trace, ack, the chord counter in the result backend, events, the log lines), whatever
library it is in. Run by `throughput.py --py-spy`, or by hand:

    python bench/pyspy_split.py /tmp/gridtune-bench-logs/pyspy-ceiling-1procs.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

CELERY = "Celery outside the task body (consume, trace, ack, chord counter, events, logs)"
GROUPS = [
    ("task body: Celery/kombu", ("celery", "kombu", "billiard", "vine", "amqp")),
    ("task body: SDK/HTTP (openai, httpx2, httpcore2, pydantic)",
     ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "h11", "anyio", "pydantic", "pydantic_core",
      "sniffio", "distro", "certifi", "idna", "jiter", "typing_extensions")),
    ("task body: DB (SQLAlchemy, psycopg)", ("sqlalchemy", "psycopg", "psycopg_binary", "psycopg_pool")),
    ("task body: Redis (redis-py: limiter, in-flight)", ("redis",)),
    ("task body: token counting (bpe_openai)", ("bpe_openai",)),
    ("task body: our code (worker, models, gridtune)", ("worker", "models", "gridtune", "producer")),
]
FRAME = re.compile(r"\((?P<path>[^()]+?)(?::\d+)?\)$")


def _group(path: str) -> str | None:
    """None for the standard library and anything unknown (the caller decides)."""
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    top = path.split("/", 1)[0].split(".", 1)[0]
    for name, packages in GROUPS:
        if top in packages:
            return name
    return None


def split(text: str) -> Counter:
    out: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        paths = [m.group("path") if (m := FRAME.search(f)) else "" for f in stack.split(";")]
        if not any(p.startswith("worker/tasks.py") for p in paths):
            out[CELERY] += int(count)
            continue
        group = next((g for p in reversed(paths) if (g := _group(p))), None)
        out[group or "task body: other"] += int(count)
    return out


def report(path: str | Path) -> dict[str, float]:
    counts = split(Path(path).read_text())
    total = sum(counts.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()} | {"samples": total}


if __name__ == "__main__":
    for k, v in report(sys.argv[1]).items():
        print(f"{v:>8}{' %' if k != 'samples' else '  '}  {k}")
