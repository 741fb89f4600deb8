"""`python -m producer eval` end to end on the simulated server (embedded: in-process worker, the
same chords as with workers): answers, swapped-position verdicts, metrics, and a resume after
the eval was killed mid-way that stores every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

from tests.acceptance.helpers import run_producer
from tests.support import clean_env, wait_for

pytestmark = pytest.mark.timeout(600)

CONFIG = """
name = "heroes"
repeats = 2
[dimensions]
age = [18, 30, 40, 60]
gender = ["man", "woman"]
power = ["flight", "telepathy", "invisibility"]
[templates]
prompt = "Imagine a complete and detailed description of a {age}-year-old {gender} fictional character who has the superpower of {power}. Write out the entire description in a maximum of 100 words in great detail:"
input = "{age}, {gender}, {power}"
[model]
max_output_tokens = 300
[dataset]
validation_fraction = 0.0
[finetune]
backend = "openai"
base_model = "gpt-4o-mini-2024-07-18"
n_epochs = 1
[eval]
holdout_repeats = 1
holdout_cells = { power = ["flight"] }
inputs = ["18, man, can eat a lot", "a quiet librarian"]
max_words = 100
"""
# 16 held-out cells by their last repeat, 8 "flight" cells, 2 free inputs.
ITEMS = 16 + 8 + 2


def rows(tmp_path, sql: str):
    engine = create_engine(f"sqlite:///{tmp_path / 'gridtune.db'}")
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).all()
    finally:
        engine.dispose()


@pytest.fixture
def swept(tmp_path):
    """The sweep and its simulated fine-tune, done; returns the environment."""
    (tmp_path / "heroes.toml").write_text(CONFIG)
    env = clean_env(GRIDTUNE_FINETUNE_POLL_SECONDS="0.2")
    done = run_producer(["sweep", "--config", "heroes.toml"], env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Left out of training: the 8 flight cells' 2 repeats and the other 16 cells' last repeat.
    assert "32 heldout" in done.stdout + done.stderr
    return env


def assert_each_row_once(tmp_path):
    answers = rows(tmp_path, "SELECT item_index, side, state FROM eval_answers")
    verdicts = rows(tmp_path, "SELECT item_index, position, state, prompt, verdict_text, winner FROM eval_judgements")
    assert sorted((a.item_index, a.side) for a in answers) == [(i, s) for i in range(ITEMS) for s in ("base", "tuned")]
    assert sorted((v.item_index, v.position) for v in verdicts) == [
        (i, p) for i in range(ITEMS) for p in ("base_first", "tuned_first")]
    assert {a.state for a in answers} == {"ok"} and {v.state for v in verdicts} == {"ok"}
    return answers, verdicts


def test_eval_on_the_simulated_server(swept, tmp_path):
    done = run_producer(["eval", "heroes", "--json"], swept, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"eval of heroes: {ITEMS} inputs; sent {2 * ITEMS} answers" in done.stderr
    summary = json.loads(done.stdout)
    assert summary["state"] == "done" and summary["inputs"] == ITEMS
    assert summary["tuned_model"].startswith("ft:gpt-4o-mini-2024-07-18:gridtune:heroes")
    assert summary["base_model"] == "gpt-4o-mini-2024-07-18" and summary["judge_model"] == "gpt-4o-mini"
    assert summary["dimensions"] == ["age", "gender", "power"]
    overall = summary["overall"]
    # The simulated judge always reads its verdict: every pair is judged, both ways.
    assert summary["judged"] == ITEMS and overall["invalid_verdicts"] == 0
    assert overall["wins"] + overall["ties"] + overall["losses"] == ITEMS
    assert overall["win_rate"] == pytest.approx((overall["wins"] + overall["ties"] / 2) / ITEMS, abs=1e-3)
    for side in ("base", "tuned"):
        assert set(overall["checks"][side]) == {"within_max_words", "mentions_values"}
        # The simulated model weaves the input's phrases into its text.
        assert overall["checks"][side]["mentions_values"] > 0.5
    sources = {json.dumps(c["cell"], sort_keys=True): c["source"] for c in summary["cells"]}
    assert sources[json.dumps({"age": 18, "gender": "man", "power": "flight"}, sort_keys=True)] == "heldout_cell"
    assert sources[json.dumps({"age": 18, "gender": "man", "power": "telepathy"}, sort_keys=True)] == "heldout_repeat"
    assert sources[json.dumps({"age": 18, "gender": "man", "power": "can eat a lot"}, sort_keys=True)] == "free_input"
    assert sources[json.dumps({"input": "a quiet librarian"}, sort_keys=True)] == "free_input"
    sample = summary["samples"][0]
    assert sample["tuned"].startswith("Fine-tuned profile:") and sample["base"]
    assert [v["order"] for v in sample["verdicts"]] == ["base_first", "tuned_first"]
    assert summary["tokens"]["answers"] > 0 and summary["tokens"]["judge"] > 0
    assert summary["cost_usd"]["judge"] > 0

    _, verdicts = assert_each_row_once(tmp_path)
    # The judge's prompts and raw verdicts are stored; positions really are swapped.
    by_item = {}
    for verdict in verdicts:
        assert "[Answer A]" in verdict.prompt and verdict.verdict_text in ("A", "B")
        by_item.setdefault(verdict.item_index, {})[verdict.position] = verdict.prompt
    first = by_item[0]
    assert first["base_first"] != first["tuned_first"]
    tuned_text = summary["samples"][0]["tuned"].strip()
    assert first["tuned_first"].index(tuned_text) < first["tuned_first"].index("[Answer B]")
    assert first["base_first"].index(tuned_text) > first["base_first"].index("[Answer B]")

    # Nothing missing: a second run sends nothing and the finalizer stays at one run.
    again = run_producer(["eval", "heroes"], swept, tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "sent 0 answers, 0 verdicts" in again.stderr
    assert "win rate" in again.stdout
    # The HTML report (producer/report.py) is written with the evaluation in it.
    report = tmp_path / "gridtune-data" / "heroes" / "report.html"
    assert f"report: {report}" in again.stdout
    page = report.read_text(encoding="utf-8")
    assert "no evaluation yet" not in page and "18, man, can eat a lot" in page
    assert rows(tmp_path, "SELECT finalizer_runs FROM eval_runs")[0][0] == 1


def test_an_interrupted_eval_resumes_and_stores_each_row_once(swept, tmp_path):
    # Paced at 5 requests/s by the shared rate budget, so it can be killed mid-way.
    slow = {**swept, "GRIDTUNE_RPM": "300"}
    first = subprocess.Popen([sys.executable, "-m", "producer", "eval", "heroes"], cwd=tmp_path, env=slow,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def stored() -> int:
            try:
                return rows(tmp_path, "SELECT count(*) FROM eval_answers")[0][0]
            except Exception:  # noqa: BLE001 - the table appears with the run
                return 0

        wait_for(lambda: stored() >= 10, 240, 0.2, "some answers")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = {(r.item_index, r.side): r.id for r in rows(tmp_path, "SELECT id, item_index, side FROM eval_answers")}
    assert 10 <= len(before) < 2 * ITEMS, len(before)
    assert rows(tmp_path, "SELECT state FROM eval_runs")[0][0] == "answering"

    again = run_producer(["eval", "heroes", "--json"], swept, tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sent {2 * ITEMS - len(before)} answers" in again.stderr
    assert json.loads(again.stdout)["state"] == "done"
    answers, _ = assert_each_row_once(tmp_path)
    after = {(r.item_index, r.side): r.id for r in rows(tmp_path, "SELECT id, item_index, side FROM eval_answers")}
    assert all(after[key] == row_id for key, row_id in before.items())  # kept, never written again
    assert rows(tmp_path, "SELECT finalizer_runs FROM eval_runs")[0][0] == 1


def test_eval_runs_on_worker_processes(redis_db, postgres_db, local_api, start_workers, tmp_path):
    """With a broker: the answers chord, the judge chord and the finalizer run on 2 worker processes
    (PostgreSQL, the shared Redis budget); `eval --wait` follows them; every row once."""
    from tests.acceptance.helpers import producer_env, query, worker_env

    (tmp_path / "heroes.toml").write_text(CONFIG)
    env = worker_env(redis_db, postgres_db, local_api, tmp_path / "data", GRIDTUNE_FINETUNE_POLL_SECONDS="0.2")
    start_workers(2, env, concurrency=20)
    done = run_producer(["sweep", "--config", "heroes.toml", "--wait", "--timeout", "300"], producer_env(env),
                        tmp_path, timeout=330)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = run_producer(["eval", "heroes", "--wait", "--json", "--timeout", "300"], producer_env(env),
                             tmp_path, timeout=330)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads(evaluated.stdout)
    assert summary["state"] == "done" and summary["judged"] == ITEMS
    answers = query(postgres_db, "SELECT item_index, side FROM eval_answers")
    verdicts = query(postgres_db, "SELECT item_index, position FROM eval_judgements WHERE state = 'ok'")
    assert sorted(answers) == [(i, s) for i in range(ITEMS) for s in ("base", "tuned")]
    assert sorted(verdicts) == [(i, p) for i in range(ITEMS) for p in ("base_first", "tuned_first")]
    assert query(postgres_db, "SELECT finalizer_runs FROM eval_runs")[0][0] == 1
