"""The spend cap holds across 4 worker processes, stops the sweep cleanly, and a higher cap resumes it.

Every worker reserves a request's worst case (prompt + max output tokens at the price) in the one
Redis budget before calling the local server, so together they can never pass the cap.
"""

from __future__ import annotations

import pytest
import redis

import localapi
from gridtune import pricing
from tests.acceptance.helpers import (
    assert_one_row_per_request,
    enqueued_count,
    producer_env,
    query,
    run_producer,
    small_config,
    sweep_row,
    wait_finished,
    worker_env,
)
from tests.support import wait_for

pytestmark = pytest.mark.timeout(240)

TOTAL = 40
PROMPT_TOKENS = 16  # "Describe hero number N in two sentences." as the server counts it
# Ten worst cases: at least ten requests get through, and the replies (about half of
# max_output_tokens) make the sweep hit the cap well before its 40 requests.
CAP = 10 * pricing.inference_cost("gpt-4o-mini", PROMPT_TOKENS, 200)


def costs(db_url: str) -> list:
    return query(db_url, "SELECT g.state, g.cost_usd, g.error_kind, g.error FROM generations g "
                         "JOIN sweeps s ON s.id = g.sweep_id WHERE s.name = 'capped'")


def test_four_workers_never_pass_the_cap_and_a_higher_cap_resumes(redis_db, postgres_db, start_workers, tmp_path):
    config = small_config(tmp_path / "capped.toml", TOTAL)
    with localapi.running(latency_ms=50) as api:
        env = worker_env(redis_db, postgres_db, api, tmp_path / "data")
        start_workers(4, env, concurrency=4)
        first = run_producer(["sweep", "--config", str(config), "--name", "capped", "--max-cost", f"{CAP:.9f}"],
                             producer_env(env), tmp_path, 60)
        assert first.returncode == 0, first.stderr
        wait_finished(postgres_db, "capped", 120)
        sent = api.stats()["requests"]
        rows = costs(postgres_db)
        assert_one_row_per_request(postgres_db, "capped", TOTAL, all_ok=False)
        ok = [r for r in rows if r.state == "ok"]
        refused = [r for r in rows if r.state != "ok"]
        assert 10 <= len(ok) < TOTAL and sent == len(ok), (len(ok), sent)
        assert sum(r.cost_usd for r in ok) <= CAP
        assert all(r.error_kind in ("spend_cap", "stopped") and "spend cap reached" in r.error for r in refused)
        budget = redis.Redis.from_url(redis_db)
        [key] = budget.keys("gridtune:spend:*")
        spent, reserved = (int(v) for v in budget.hmget(key, ["spent", "reserved"]))
        assert reserved == 0 and spent <= CAP * 1e9

        status = run_producer(["status", "capped"], producer_env(env), tmp_path, 30)
        assert f"of a ${CAP:.4f} cap" in status.stdout, status.stdout
        resumed = run_producer(["sweep", "--config", str(config), "--name", "capped", "--max-cost", "1"],
                               producer_env(env), tmp_path, 60)
        assert resumed.returncode == 0, resumed.stderr
        assert enqueued_count(resumed.stderr) == TOTAL - len(ok)
        wait_for(lambda: (s := sweep_row(postgres_db, "capped")).finalizer_runs == 2 and s.state in ("done", "failed"),
                 120, 0.5, "the resumed sweep to finish")
    assert_one_row_per_request(postgres_db, "capped", TOTAL)
    assert sum(r.cost_usd for r in costs(postgres_db)) <= 1
