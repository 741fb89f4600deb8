"""A server that queues instead of refusing: 2 worker processes (32 threads) against localapi's
overload mode, which serves 4 requests at full speed and slows everyone down beyond that.

Without the shared in-flight limit all 32 threads send at once, latency is 8x the unloaded one and
past the request timeout set here: every request times out and is sent again into the same queue.
With it, the workers keep about the server's capacity in flight and every request is answered at
its first attempt.
"""

from __future__ import annotations

import json

import pytest

import localapi
from tests.acceptance.helpers import (assert_one_row_per_request, producer_env, query, run_producer, wait_finished,
                                      worker_env)

pytestmark = pytest.mark.timeout(240)

TOTAL = 120
CAPACITY = 4
LATENCY_MS = 300  # unloaded; 32 in flight would take 8 x 300 ms = 2.4 s, past the 1.5 s timeout


def test_workers_keep_a_queueing_server_near_its_capacity_and_nothing_times_out(
        redis_db, postgres_db, start_workers, tmp_path):
    config = tmp_path / "overload.toml"
    config.write_text(f"""
[dimensions]
n = {json.dumps(list(range(TOTAL)))}
[templates]
prompt = "Describe hero number {{n}} in two sentences."
input = "hero {{n}}"
[model]
max_output_tokens = 120
[finetune]
backend = "none"
""")
    with localapi.running(latency_ms=LATENCY_MS, overload_capacity=CAPACITY) as api:
        # A visibility timeout above the run: a redelivered task would be a second request too.
        env = worker_env(redis_db, postgres_db, api, tmp_path / "data", GRIDTUNE_REQUEST_TIMEOUT="1.5",
                         GRIDTUNE_VISIBILITY_TIMEOUT="600")
        start_workers(2, env, concurrency=16)
        result = run_producer(["sweep", "--config", str(config), "--name", "overload"], producer_env(env), tmp_path, 60)
        assert result.returncode == 0, result.stderr
        sweep = wait_finished(postgres_db, "overload", 180)
        stats = api.stats()

    assert sweep.state == "done"
    assert_one_row_per_request(postgres_db, "overload", TOTAL)
    # No timeout, no retry: each request reached the server once.
    retried = query(postgres_db, "SELECT request_index, attempts FROM generations WHERE attempts <> 1")
    assert retried == []
    assert stats["requests"] == TOTAL, stats
    # The server never held the 32 the threads could send (slow start overshoots once, and on a
    # loaded machine the first latencies are noisy: the bound is loose, the timeouts above are
    # what matters).
    assert stats["overload"]["max_in_flight"] <= 20, stats
