"""Shared helpers for the gridtune benchmarks (scripts, not tests). Traffic goes to 127.0.0.1 only.

Every benchmark uses a dedicated Redis db (default 9, `BENCH_REDIS_DB`), flushed before and after,
and throw-away databases (SQLite files in a temp dir, or `gridtune_bench_*` Postgres databases
created and dropped here). Nothing touches Redis db 0 or the `test` Postgres database's tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "9"))
if REDIS_DB == 0:
    raise SystemExit("bench: refusing to use Redis db 0 (shared); set BENCH_REDIS_DB to a spare db")
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
PYTHON = sys.executable


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def redis_used_memory() -> int:
    import redis

    return int(redis.Redis.from_url(REDIS_URL).info("memory")["used_memory"])


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute(sql)


@contextmanager
def postgres_database(prefix: str = "gridtune_bench") -> Iterator[str]:
    """A fresh Postgres database, dropped afterwards; yields its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        from models import dispose_engines

        dispose_engines()
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: dedicated broker/backend/limiter Redis db."""
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_RESULT_BACKEND=REDIS_URL,
        GRIDTUNE_REDIS_URL=REDIS_URL,
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("PYTHONPATH", str(ROOT))
    env.update(extra)
    return env


def sweep_toml(dims: list[int], *, repeats: int = 1, rpm: int | None = None, system: bool = False) -> str:
    """A sweep config whose grid has prod(dims) * repeats requests; fine-tune backend none."""
    names = ["a", "b", "c", "d", "e"][: len(dims)]
    lines = ['name = "bench"', f"repeats = {repeats}", "", "[dimensions]"]
    for name, size in zip(names, dims):
        lines.append(f"{name} = [{', '.join(str(i) for i in range(size))}]")
    fields = " ".join(f"{n}={{{n}}}" for n in names)
    lines += [
        "",
        "[templates]",
        f'prompt = "Describe a fictional character with {fields} in at most 30 words:"',
        f'input = "{fields}"',
    ]
    if system:
        lines.append('system = "You write short character sketches."')
    lines += ["", "[model]", 'name = "gpt-4o-mini"', "max_output_tokens = 300"]
    if rpm:
        lines.append(f"rpm = {rpm}")
    lines += ["", "[dataset]", "min_examples = 1", "", "[finetune]", 'backend = "none"']
    return "\n".join(lines) + "\n"


# --- localapi -------------------------------------------------------------------------------------
class LocalAPI:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "localapi", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=bench_env(),
        )
        deadline = time.monotonic() + 30
        self.base_url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.base_url = m.group(1)
                break
        if not self.base_url:
            self.stop()
            raise RuntimeError("localapi did not start")

    @property
    def root(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0]

    def stats(self) -> dict:
        with urllib.request.urlopen(self.root + "/_stats", timeout=10) as r:
            return json.load(r)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- process CPU from /proc -----------------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime of `pid` (plus its reaped children's cutime+cstime), from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime=14, stime=15, cutime=16, cstime=17 (1-based)
    ut, st, cut, cst = (int(fields[i]) for i in (11, 12, 13, 14))
    return (ut + st + ((cut + cst) if children else 0)) / _TICKS


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def tree_cpu_seconds(pid: int) -> float:
    return proc_cpu_seconds(pid) + sum(proc_cpu_seconds(k) for k in descendants(pid))


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.strip()
    return f"nproc={os.cpu_count()}, {time.strftime('%Y-%m-%d %H:%M %Z')}\n{free}"


def rm_rf(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- Redis and Postgres server CPU (whole servers: other clients count too, so run on a quiet box) --
def _postmaster_pid() -> int | None:
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            if (pid / "comm").read_text().strip() != "postgres":
                continue
            ppid = int((pid / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if (Path(f"/proc/{ppid}/comm").read_text().strip() if ppid > 1 else "") != "postgres":
                return int(pid.name)
        except (FileNotFoundError, ProcessLookupError, ValueError, PermissionError):
            continue
    return None


def server_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of the Redis server (INFO cpu) and of the local Postgres (postmaster,
    its live backends and the reaped ones); NaN where unreadable."""
    out = {"redis": float("nan"), "postgres": float("nan")}
    try:
        import redis

        info = redis.Redis.from_url(REDIS_URL).info("cpu")
        out["redis"] = sum(float(info[k]) for k in ("used_cpu_sys", "used_cpu_user", "used_cpu_sys_children",
                                                    "used_cpu_user_children"))
    except Exception:  # noqa: BLE001 - a figure, not a requirement
        pass
    pm = _postmaster_pid()
    if pm:
        out["postgres"] = tree_cpu_seconds(pm)
    return out
