"""A 429 pauses the whole cluster, not just the task that met it (docs/reliability.md §5).

Two workers (two WorkerContexts, as in two processes) share one Redis (a fakeredis server). Worker
A meets a 429 with `retry-after: 1` and gives its slot back; worker B, which has seen no 429,
must not send anything until the pause is over. What was recorded decides: the shared Redis
holds a pause of at least the second the 429 asked for, the local server accepted B's request
only after that pause ended, and B was never refused.
"""

from __future__ import annotations

import time

import fakeredis

import localapi
from models import RowState, store
from tests.unit.test_generation import make_context, new_sweep, rows
from worker import llm
from worker.generation import run_request


def sweep_model(ctx, sweep) -> str:
    return store.sweep_config(store.get_sweep_by_id(ctx.engine, sweep.id)).model.name


def test_a_429_on_one_worker_pauses_the_others(tmp_path):
    shared = fakeredis.FakeServer()
    with localapi.running(fault_rate=1.0, faults=("429",)) as server:
        a = make_context(tmp_path, server, GRIDTUNE_MAX_INLINE_WAIT=0.1)
        b = make_context(tmp_path, server, GRIDTUNE_MAX_INLINE_WAIT=5)
        for ctx in (a, b):
            ctx.__dict__["redis"] = fakeredis.FakeRedis(server=shared)  # one Redis for both "processes"
        sweep = new_sweep(a)

        started = time.time()
        first = run_request(a, sweep.id, 0)
        assert first.retry_in is not None and first.rate_limited == 1 and not first.stored
        server.update(fault_rate=0.0)  # the provider would accept now; only the pause holds B back
        # What the shared Redis recorded: a pause for everyone, as long as the 429 asked for.
        budget = a.limiter.redis_key(llm.budget_key(sweep_model(a, sweep), a.settings))
        cool_until = int(fakeredis.FakeRedis(server=shared).hget(budget, "cool_until") or 0) / 1e6
        assert cool_until >= started + 1.0, (cool_until, started)

        second = run_request(b, sweep.id, 1)
        stats = server.stats()
    assert second.stored and second.rate_limited == 0  # B waited; it was never refused itself
    assert rows(b, sweep)[1].state == RowState.OK
    assert stats["faults"] == {"429": 1} and stats["requests"] == 2, stats
    # The server accepted B's request only once the pause A's 429 asked for (retry-after 1 s) was over.
    assert stats["first_accepted_at"] >= cool_until, (stats["first_accepted_at"], cool_until)
