"""Reference row for the ceiling: bespokelabs-curator against the same localapi (no limit, no latency).

curator runs in its own virtualenv (`--venv`, default /tmp/gridtune-curator-venv), created here on
first use with `pip install bespokelabs-curator==0.1.31`; gridtune's venv is not touched. The run
stays on 127.0.0.1: telemetry off, cache off, Hugging Face offline, litellm's local cost map, and
tiktoken's vocabulary cache seeded from the copies bpe-openai ships (tiktoken would download them).
The client's CPU comes from /proc (the curator process and its children), as for the workers.

    python bench/curator.py --requests 20000

Prints one JSON line and a markdown row: requests/s over the run and client CPU ms/request.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import LocalAPI, md_table, proc_cpu_seconds  # noqa: E402

CURATOR = "bespokelabs-curator==0.1.31"
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

# Runs inside curator's venv: the same prompts as the ceiling sweep (bench.common.sweep_toml).
CHILD = r"""
import json, os, sys, time
from bespokelabs import curator
n = int(sys.argv[1])
prompts = [f"Describe a fictional character with a={i // 200} b={(i // 10) % 20} c={i % 10} in at most 30 words:"
           for i in range(n)]
llm = curator.LLM(model_name="gpt-4o-mini", backend="openai", generation_params={"max_tokens": 300},
                  backend_params={"base_url": os.environ["OPENAI_BASE_URL"], "api_key": os.environ["OPENAI_API_KEY"],
                                  "max_requests_per_minute": 10_000_000, "max_tokens_per_minute": 10_000_000_000,
                                  "max_retries": 1, "require_all_responses": False})
t0 = time.time()
out = llm(prompts)
print("RESULT " + json.dumps({"wall_s": time.time() - t0, "rows": len(out.dataset) if hasattr(out, "dataset") else len(out)}))
"""


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    check = subprocess.run([str(python), "-c", "import bespokelabs.curator"], capture_output=True)
    if check.returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", CURATOR], check=True)
    return python


def seed_tiktoken(cache: Path) -> None:
    """tiktoken looks for sha1(url) in TIKTOKEN_CACHE_DIR before downloading."""
    import bpe_openai

    data = Path(bpe_openai.__file__).parent / "data"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("cl100k_base", "o200k_base"):
        target = cache / hashlib.sha1(TIKTOKEN_URL.format(name=name).encode()).hexdigest()
        if not target.exists():
            target.write_bytes(gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("CURATOR_VENV", "/tmp/gridtune-curator-venv")))
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    api = LocalAPI("--latency-ms", "0")
    try:
        with tempfile.TemporaryDirectory(prefix="gridtune-bench-curator-") as tmp:
            seed_tiktoken(Path(tmp) / "tiktoken")
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            env.update(
                OPENAI_BASE_URL=api.base_url, OPENAI_API_KEY="sk-bench-local",
                TELEMETRY_ENABLED="false", CURATOR_DISABLE_CACHE="true", CURATOR_DISABLE_RICH_DISPLAY="1",
                CURATOR_CACHE_DIR=str(Path(tmp) / "cache"), HF_HOME=str(Path(tmp) / "hf"), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", LITELLM_LOCAL_MODEL_COST_MAP="True",
                TIKTOKEN_CACHE_DIR=str(Path(tmp) / "tiktoken"), PYTHONUNBUFFERED="1",
            )
            script = Path(tmp) / "child.py"
            script.write_text(CHILD)
            api_cpu0 = api.cpu_seconds()
            log = open(Path(tmp) / "child.log", "w+")
            child = subprocess.Popen([str(python), str(script), str(args.requests)], env=env, cwd=tmp,
                                     stdout=log, stderr=subprocess.STDOUT)
            # CPU is read while the process still exists: its own plus its reaped children's.
            cpu = 0.0
            deadline = time.monotonic() + args.max_seconds
            while child.poll() is None and time.monotonic() < deadline:
                cpu = proc_cpu_seconds(child.pid)
                time.sleep(0.2)
            if child.poll() is None:
                child.kill()
            child.wait()
            api_cpu = api.cpu_seconds() - api_cpu0
            log.seek(0)
            text = log.read()
            stats = api.stats()
    finally:
        api.stop()
    result_lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if not result_lines:
        raise SystemExit(f"curator run failed:\n{text[-3000:]}")
    result = json.loads(result_lines[-1][len("RESULT "):])
    served = stats["requests"]
    out = dict(client="curator 0.1.31", requests=args.requests, rows=result["rows"], wall_s=result["wall_s"],
               requests_per_s=served / result["wall_s"], client_cpu_s=cpu,
               client_cpu_ms_per_request=1000 * cpu / max(served, 1),
               server_cpu_ms_per_request=1000 * api_cpu / max(served, 1), server=stats)
    print(json.dumps(out), file=sys.stderr)
    print(md_table(["client", "requests", "rows", "wall s", "requests/s", "client CPU ms/request",
                    "localapi CPU ms/request"],
                   [[out["client"], served, out["rows"], out["wall_s"], out["requests_per_s"],
                     out["client_cpu_ms_per_request"], out["server_cpu_ms_per_request"]]]))


if __name__ == "__main__":
    main()
