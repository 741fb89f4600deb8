"""The window bounds at the burst production uses (GRIDTUNE_BURST_SECONDS, default 0.5 s).

tests/unit/test_ratelimit.py proves the bounds at the limiter's own default (1 s). Workers build
their limiter from Settings (`WorkerContext.limiter`); these tests take the limiter that way and
drive it on the simulated clock: the burst is half a second of the rate, and no 60 s window ever
admits more than the limit plus that burst.
"""

from __future__ import annotations

import random

import fakeredis

from gridtune.settings import Settings
from tests.unit.test_ratelimit import (  # noqa: F401 - fixtures
    KEY,
    MINUTE_US,
    UNCONSTRAINED,
    clock,
    configured,
    greedy,
    make_limiter,
    max_in_window,
    random_callers,
    server,
)
from worker.context import WorkerContext

PRODUCTION_BURST = Settings().burst_seconds


def production_limiter(make_limiter, server):
    """What a worker builds (`WorkerContext.limiter`), with the simulated clock."""
    ctx = WorkerContext(Settings())
    ctx.__dict__["redis"] = fakeredis.FakeRedis(server=server)
    assert ctx.limiter._burst_us == round(PRODUCTION_BURST * 1_000_000)
    return make_limiter(burst_seconds=PRODUCTION_BURST)


def test_production_bursts_half_a_second(make_limiter, server, clock):
    assert PRODUCTION_BURST == 0.5  # below the provider's 1 s (docs: budget bursts 0.5 s)
    limiter = configured(production_limiter(make_limiter, server), rpm=600, tpm=UNCONSTRAINED)
    grants = greedy(limiter, clock, [1] * 700)
    times = [t for t, _ in grants]
    assert times[:5] == [times[0]] * 5 and times[5] > times[0]  # 0.5 s worth of 10/s at once
    assert [b - a for a, b in zip(times[5:], times[6:])] == [100_000] * (len(times) - 6)
    assert max_in_window(grants) == 600 + 5


def test_random_callers_stay_within_limit_plus_the_production_burst(make_limiter, server, clock):
    """Three processes, six callers, random costs; both dimensions bind at times (one seed: the
    full random matrix at the 1 s burst lives in test_ratelimit.py)."""
    rng, rpm, tpm, max_cost = random.Random(0), 600, 60_000, 400
    limiters = [configured(production_limiter(make_limiter, server), rpm, tpm) for _ in range(3)]
    grants = random_callers(limiters, clock, rng, max_cost)
    assert max_in_window(grants) <= rpm + rpm / 60 * PRODUCTION_BURST
    assert max_in_window(grants, tokens=True) <= tpm + tpm / 60 * PRODUCTION_BURST + max(c for _, c in grants)
