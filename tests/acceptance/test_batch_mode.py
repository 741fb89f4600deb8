"""Batch mode with real processes: the tutorial's 294 requests through /v1/batches on 2 workers.

Three batches (100 requests each at most); the local server fails some lines (500s, in the error
file). Every request ends with exactly one row, the finalizer runs once, nothing goes through
/v1/chat/completions; then `sweep --online` retries the failed requests online.
"""

from __future__ import annotations

import pytest

import localapi
from tests.acceptance.helpers import (
    assert_one_row_per_request,
    enqueued_count,
    query,
    producer_env,
    run_producer,
    sweep_row,
    worker_env,
)

pytestmark = pytest.mark.timeout(240)


def test_the_default_sweep_in_batch_mode_then_failures_retried_online(redis_db, postgres_db, start_workers, tmp_path):
    with localapi.running(batch_seconds=0.5, batch_failure_rate=0.05, seed=4) as api:
        env = worker_env(redis_db, postgres_db, api, tmp_path / "data", GRIDTUNE_BATCH_MAX_REQUESTS="100",
                         GRIDTUNE_BATCH_POLL_SECONDS="0.3")
        start_workers(2, env, concurrency=4)
        first = run_producer(["sweep", "--batch", "--wait", "--timeout", "120"], producer_env(env), tmp_path, 150)
        assert first.returncode == 0, first.stderr
        rows = assert_one_row_per_request(postgres_db, "superhero", 294, all_ok=False)
        failed = [r for r in rows if r.state != "ok"]
        assert failed and all(r.error_kind == "server_error" and r.error.startswith("HTTP 500") for r in failed)
        sweep = sweep_row(postgres_db, "superhero")
        assert sweep.state == "done" and sweep.finalizer_runs == 1
        assert api.stats()["requests"] == 0  # every request went through a batch
        batches = query(postgres_db, "SELECT request_count, provider_batch_id, ingested_at FROM batches")
        assert sorted(b.request_count for b in batches) == [94, 100, 100]
        assert all(b.provider_batch_id and b.ingested_at for b in batches)
        costs = query(postgres_db, "SELECT count(*) FROM generations WHERE state = 'ok' AND cost_usd > 0")
        assert costs[0][0] == 294 - len(failed)

        again = run_producer(["sweep", "--online", "--wait", "--timeout", "120"], producer_env(env), tmp_path, 150)
        assert again.returncode == 0, again.stderr
        assert enqueued_count(again.stderr) == len(failed)
        assert api.stats()["accepted"] == len(failed)
    assert_one_row_per_request(postgres_db, "superhero", 294)
    assert sweep_row(postgres_db, "superhero").finalizer_runs == 2
