"""The producer commands' happy paths, as a user runs them (embedded mode: SQLite, in-process
worker, the local API server with faults under the test's control), on one sweep:

1. every request fails (HTTP 500, one attempt each): the sweep ends `failed`;
2. resume retries failed rows: `sweep` again with the same name, the API healthy now, sends
   exactly the failed requests and every row ends ok;
3. `status` (plain, --json, --watch on a finished sweep), `list` (plain, --json) and
   `export --jsonl` report what the database and the server recorded;
4. `--replace-config` resumes the sweep under a bigger grid: stored rows are kept, only the new
   requests are sent.

`sweep` runs as a subprocess; the read-only commands run in this process (`producer.cli.main`),
which is the same code without a second interpreter start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import localapi
from gridtune.settings import reset_settings
from producer.cli import main
from tests.acceptance.helpers import resume_counts, run_producer
from tests.support import clean_env
from worker.context import reset_context
from worker.dataset import validate_example

pytestmark = pytest.mark.timeout(240)


def config(path: Path, values: int) -> Path:
    path.write_text(f"""
[dimensions]
n = {json.dumps(list(range(values)))}
[templates]
prompt = "Describe hero number {{n}} in two sentences."
input = "hero {{n}}"
[model]
max_output_tokens = 120
[dataset]
min_examples = 1
validation_fraction = 0
[finetune]
backend = "none"
""", encoding="utf-8")
    return path


@pytest.fixture
def commands(tmp_path, monkeypatch, capsys):
    """(env for `sweep` subprocesses, run(args) -> (exit code, stdout, stderr) in this process)."""
    env: dict[str, str] = {}

    def run(args: list[str]) -> tuple[int, str, str]:
        for key, value in env.items():
            if key.startswith(("GRIDTUNE_", "OPENAI_")) or key == "DATABASE_URL":
                monkeypatch.setenv(key, value)
        reset_settings()
        reset_context()
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err

    yield env, run
    reset_context()


def test_resume_retries_failed_rows_replace_config_and_the_commands_report_it(tmp_path, commands):
    env, cli = commands
    total = 8
    cfg, bigger = config(tmp_path / "cmd.toml", total), config(tmp_path / "bigger.toml", total + 2)
    with localapi.running(fault_rate=1.0, faults=("500",)) as api:
        env.update(clean_env(DATABASE_URL=f"sqlite:///{tmp_path / 'cmd.db'}", OPENAI_API_KEY="sk-test-commands",
                             OPENAI_BASE_URL=api.base_url, GRIDTUNE_DATA_DIR=str(tmp_path / "data"),
                             GRIDTUNE_BACKOFF_CAP="0.1", GRIDTUNE_MAX_ATTEMPTS="1"))

        def sweep(*args: str):
            return run_producer(["sweep", "--name", "cmd", *args], env, tmp_path, timeout=120)

        # 1. Everything fails.
        first = sweep("--config", str(cfg))
        assert first.returncode == 1, first.stderr  # the sweep ended failed: no usable example
        assert resume_counts(first.stderr) == (total, 0)
        code, out, _ = cli(["status", "cmd", "--json"])
        failed = json.loads(out)
        assert (code, failed["state"], failed["ok"], failed["failed"], failed["errors"]) == (
            0, "failed", 0, total, {"server_error": total})

        # 2. Resume retries the failed rows.
        api.update(fault_rate=0.0)
        api.reset()
        again = sweep("--config", str(cfg))
        assert again.returncode == 0, again.stderr
        assert resume_counts(again.stderr) == (total, 0)  # the failed requests, all of them
        server = api.stats()
        assert server["accepted"] == total == server["requests"]

        # 3. What the commands report.
        code, out, _ = cli(["status", "cmd", "--json"])
        status = json.loads(out)
        assert {k: status[k] for k in ("state", "total", "ok", "failed", "remaining", "finalizer_runs")} == {
            "state": "done", "total": total, "ok": total, "failed": 0, "remaining": 0, "finalizer_runs": 2}
        # Token counts are what the server counted for the calls it accepted.
        assert (status["prompt_tokens"], status["completion_tokens"]) == (server["prompt_tokens"],
                                                                          server["completion_tokens"])
        code, plain, _ = cli(["status", "cmd"])
        assert code == 0 and plain.splitlines()[:3] == [
            "sweep cmd: done",
            f"  requests  {total}/{total} done: {total} ok, 0 failed, 0 to go, 0 in flight",
            f"  tokens    {server['prompt_tokens']:,} prompt + {server['completion_tokens']:,} completion; "
            f"{status['truncated']} truncated; 0 rate-limited (429) retries"]
        assert cli(["status", "cmd", "--watch", "--interval", "0.1"])[:2] == (0, plain)

        code, out, _ = cli(["list"])
        assert code == 0 and [line.split()[:3] for line in out.splitlines()] == [["cmd", "done", str(total)]]
        code, out, _ = cli(["list", "--json"])
        assert [(s["name"], s["state"], s["total"]) for s in json.loads(out)] == [("cmd", "done", total)]

        code, _, err = cli(["export", "cmd", "--jsonl", str(tmp_path / "cmd.jsonl")])
        examples = read_jsonl(tmp_path / "cmd.jsonl")
        # One line per whole ok answer: the truncated ones (max_output_tokens = 120) are left out.
        assert code == 0 and f"exported {len(examples)} lines to" in err
        assert len(examples) == total - status["truncated"] > 0
        heroes = [int(e["messages"][0]["content"].removeprefix("hero ")) for e in examples]
        assert heroes == sorted(set(heroes)) and set(heroes) <= set(range(total))
        assert all(validate_example(e) == [] for e in examples)
        assert all(f"hero number {n}" in e["messages"][-1]["content"].lower() for n, e in zip(heroes, examples))

        # 4. A bigger grid under the same name: refused, then resumed with --replace-config.
        refused = sweep("--config", str(bigger))
        assert refused.returncode == 2 and "--replace-config" in refused.stderr
        replaced = sweep("--config", str(bigger), "--replace-config")
        assert replaced.returncode == 0, replaced.stderr
        assert resume_counts(replaced.stderr) == (2, total)
        assert api.stats()["accepted"] == total + 2  # only the new requests were sent
        assert cli(["export", "cmd", "--jsonl", str(tmp_path / "bigger.jsonl")])[0] == 0
        after = read_jsonl(tmp_path / "bigger.jsonl")
        status = json.loads(cli(["status", "cmd", "--json"])[1])
        assert (status["state"], status["total"], status["ok"]) == ("done", total + 2, total + 2)
        assert len(after) == total + 2 - status["truncated"]
        assert after[:len(examples)] == examples  # the stored rows were kept


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
