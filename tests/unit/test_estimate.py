"""The pre-flight estimate (`sweep --dry-run`, `estimate`) against a real run of the same sweep.

The run is the real thing without Celery: `run_request` for every index, the real SDK against the
local server, which reports `usage` counted like OpenAI. The estimate's input tokens must equal
the server's prompt tokens exactly, and nothing may be stored or sent by the estimate itself.
"""

from __future__ import annotations

import json

import pytest

import localapi
from gridtune import pricing
from gridtune.settings import Settings
from gridtune.sweep import parse_config
from models import RowState, store
from producer.cli import main
from producer.estimate import History, duration_seconds, estimate
from worker.context import WorkerContext
from worker.generation import run_request
from worker.ratelimit import Limits

CONFIG = """
name = "est"
repeats = 2
[dimensions]
age = [18, 40, 90]
power = ["flight", "healing", "très rapide ✈"]
[templates]
system = "You write short character sketches."
prompt = "Describe a {age}-year-old with the superpower of {power}, in two sentences."
input = "{age}, {power}"
[model]
name = "gpt-4o-mini"
max_output_tokens = 60
rpm = 600
[finetune]
backend = "none"
"""


def dry_run(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_matches_a_real_run_of_the_same_sweep(tmp_path, capsys, monkeypatch):
    config_path = tmp_path / "est.toml"
    config_path.write_text(CONFIG, encoding="utf-8")
    db = tmp_path / "est.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db}")
    with localapi.running() as server:
        before = dry_run(capsys, "sweep", "--config", str(config_path), "--dry-run")
        assert not db.exists(), "a dry run must not create the database"
        assert server.stats()["requests"] == 0
        assert before["requests"] == 18 and before["combinations"] == 9 and before["repeats"] == 2
        assert before["output_tokens_max"] == 18 * 60 and before["output_tokens_expected"] is None
        assert before["rpm"] == 600 and before["limits_from"] == "sweep config"
        assert before["seconds_online"] == pytest.approx(18 / 600 * 60)

        # The real run of the same sweep.
        ctx = WorkerContext(Settings(DATABASE_URL=f"sqlite:///{db}", OPENAI_API_KEY="sk-test-estimate",
                                     OPENAI_BASE_URL=server.base_url))
        sweep, _ = store.create_or_resume_sweep(ctx.engine, "est", parse_config(CONFIG))
        for index in range(sweep.total_requests):
            assert run_request(ctx, sweep.id, index).stored
        rows = list(store.iter_rows(ctx.engine, sweep.id))
        assert len(rows) == 18 and all(row.state == RowState.OK for row in rows)
        prompt_tokens = sum(row.prompt_tokens for row in rows)
        completion_tokens = sum(row.completion_tokens for row in rows)

        assert before["input_tokens"] == prompt_tokens  # exact, not approximately
        assert completion_tokens <= before["output_tokens_max"]
        actual_cost = pricing.inference_cost("gpt-4o-mini", prompt_tokens, completion_tokens)
        assert actual_cost <= before["cost_online_max"]
        assert before["cost_batch_max"] == pytest.approx(before["cost_online_max"] / 2)

        # Afterwards the estimate (same figures by the `estimate` command) knows the expected output.
        sent = server.stats()["requests"]
        after = dry_run(capsys, "estimate", "--config", str(config_path))
        assert server.stats()["requests"] == sent
        assert store.find_sweep(ctx.engine, "est") is not None and len(store.list_sweeps(ctx.engine)) == 1
    assert after["input_tokens"] == prompt_tokens
    assert after["output_tokens_expected"] == completion_tokens and after["expected_from"] == ["est"]
    assert after["cost_online_expected"] == pytest.approx(actual_cost)
    assert after["cost_batch_expected"] == pytest.approx(actual_cost / 2)


def test_the_human_estimate_names_every_figure(tmp_path, capsys):
    path = tmp_path / "est.toml"
    path.write_text(CONFIG, encoding="utf-8")
    assert main(["estimate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for words in ("requests       18", "input tokens", "at most 1,080", "cost online", "cost batch",
                  "about 2s at 600 RPM (sweep config)", "up to 24 h"):
        assert words in out, out


def test_expected_output_never_exceeds_this_sweeps_maximum():
    config = parse_config(CONFIG)
    est = estimate("x", config, Settings(), history=History(rows=2, completion_tokens=400, sweeps=["old"]))
    assert est.output_tokens_expected == 18 * 60


def test_limits_come_from_the_environment_then_the_config_then_what_was_learnt():
    no_limits = parse_config(CONFIG.replace("rpm = 600\n", ""))
    env = estimate("x", no_limits, Settings(GRIDTUNE_RPM=60, GRIDTUNE_TPM=1000), learnt=lambda: Limits(rpm=5))
    assert (env.rpm, env.tpm, env.limits_from) == (60, 1000, "GRIDTUNE_RPM/TPM")
    learnt = estimate("x", no_limits, Settings(), learnt=lambda: Limits(tpm=10_000))
    assert (learnt.rpm, learnt.tpm, learnt.limits_from) == (None, 10_000, "learnt")
    assert learnt.seconds_online == pytest.approx((learnt.input_tokens + learnt.output_tokens_max) / 10_000 * 60)
    unknown = estimate("x", no_limits, Settings())
    assert unknown.seconds_online is None and unknown.limits_from is None


def test_duration_is_the_slower_pace():
    assert duration_seconds(120, 1000, Limits(rpm=60, tpm=1_000_000)) == pytest.approx(120)
    assert duration_seconds(120, 1_000_000, Limits(rpm=60, tpm=100_000)) == pytest.approx(600)
    assert duration_seconds(10, 10, Limits()) is None


def test_an_unpriced_model_has_no_cost_but_still_an_estimate(tmp_path, capsys):
    path = tmp_path / "est.toml"
    path.write_text(CONFIG.replace('"gpt-4o-mini"', '"my-local-model"'), encoding="utf-8")
    est = dry_run(capsys, "estimate", "--config", str(path))
    assert est["cost_online_max"] is None and est["input_tokens"] > 0


def test_learnt_limits_are_found_by_model_without_the_api_key():
    import fakeredis

    from worker.ratelimit import RateLimiter

    limiter = RateLimiter(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    limiter.observe("gpt-4o-mini:abc123", {"x-ratelimit-limit-requests": "500", "x-ratelimit-limit-tokens": "200000"})
    limiter.observe("gpt-4o:abc123", {"x-ratelimit-limit-requests": "9"})
    assert limiter.learnt("gpt-4o-mini:") == Limits(rpm=500, tpm=200_000)
    assert limiter.learnt("gpt-4o:") == Limits(rpm=9)
    assert limiter.learnt("gpt-4.1:") == Limits()
