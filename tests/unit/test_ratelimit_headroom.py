"""Headroom: the shared budget against the simulated server's provider models, on one fake clock.

A discrete-event run: `concurrency` workers share one `RateLimiter` (fakeredis, real Lua) and send
to `localapi.budget.RateLimiter` (the simulated server's budget) exactly as worker/generation.py
does: reserve, send, observe the headers, cool down after a 429. Nothing sleeps: time is the
clock the events carry.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from dataclasses import dataclass, field

import fakeredis
import pytest

from localapi.budget import RateLimiter as ServerBudget
from worker.ratelimit import Limits, RateLimiter
from tests.unit.test_ratelimit import KEY, SimClock

API_KEY = "sk-sim"
NO_HINT_BACKOFF = 1.0  # what a worker waits after a 429 that says nothing about when to retry


@dataclass
class Run:
    seconds: float = 0.0
    refused_at: list[float] = field(default_factory=list)  # seconds since the start
    quantized_at: float | None = None  # when the budget first said so


def simulate(limiter: RateLimiter, server: ServerBudget, clock: SimClock, *, requests: int,
             concurrency: int, latency: float) -> Run:
    start, run, order = clock.us, Run(), itertools.count()
    events = [(start, next(order), "try", None) for _ in range(concurrency)]
    heapq.heapify(events)
    unsent, done = requests, 0
    while events:
        at, _, kind, headers = heapq.heappop(events)
        clock.us = at
        now = clock.seconds()
        if kind == "response":
            limiter.observe(KEY, headers)
            done += 1
            if done == requests:
                run.seconds = (at - start) / 1e6
                return run
        elif unsent == 0:
            continue  # nothing left for this worker to send
        elif (wait := limiter.reserve(KEY, 0)) > 0:
            heapq.heappush(events, (at + round(wait * 1e6), next(order), "try", None))
            continue
        else:
            refusal = server.try_spend(API_KEY, 0, now)
            headers = server.headers(API_KEY, now)
            if refusal is not None:
                run.refused_at.append((at - start) / 1e6)
                limiter.observe(KEY, headers)
                limiter.cool_down(KEY, refusal.wait_seconds if refusal.says_when else NO_HINT_BACKOFF)
                if run.quantized_at is None and limiter.quantized(KEY):
                    run.quantized_at = (at - start) / 1e6
            else:
                unsent -= 1
                heapq.heappush(events, (at + round(latency * 1e6), next(order), "response", headers))
                continue
        heapq.heappush(events, (clock.us, next(order), "try", None))
    raise AssertionError(f"the run stalled after {done} of {requests} requests")


@pytest.fixture
def make_limiter():
    server, clock, namespace = fakeredis.FakeServer(), SimClock(), f"test:{uuid.uuid4().hex}"

    def make(rpm: int = 3000, **options) -> tuple[RateLimiter, SimClock]:
        # As worker/context.py: limits unknown until the headers teach them.
        limiter = RateLimiter(fakeredis.FakeRedis(server=server), namespace=namespace, burst_seconds=0.5,
                              fallback=Limits(), clock=clock.seconds, **options)
        limiter.configure(KEY, Limits(rpm=rpm))  # as a sweep config's `rpm`
        return limiter, clock

    return make


RPM = 300  # 5 per second
LATENCY = 0.2
CONCURRENCY = 6  # at most 30 per second: the client can go 6x faster than the refill


def test_a_token_bucket_is_spent_early_and_the_sweep_takes_the_ideal_time(make_limiter):
    limiter, clock = make_limiter(RPM)
    server = ServerBudget(rpm=RPM, tpm=None, burst_seconds=1.0, model="token-bucket")
    requests = 2 * RPM
    run = simulate(limiter, server, clock, requests=requests, concurrency=CONCURRENCY, latency=LATENCY)

    # Perfect knowledge: the full bucket (one minute, RPM requests) at once, the rest at the refill.
    ideal = (requests - RPM) / (RPM / 60) + LATENCY
    assert run.seconds <= 1.05 * ideal, f"{run.seconds:.1f} s for an ideal of {ideal:.1f} s"
    assert len(run.refused_at) <= requests // 100
    assert not limiter.quantized(KEY)
    # Pacing at the nominal rate (headroom off) would take twice as long: the comparison is real.
    assert requests / (RPM / 60) > 1.5 * ideal


def test_without_headroom_the_token_bucket_sweep_paces_at_the_nominal_rate(make_limiter):
    limiter, clock = make_limiter(RPM, headroom=False)
    server = ServerBudget(rpm=RPM, tpm=None, burst_seconds=1.0, model="token-bucket")
    run = simulate(limiter, server, clock, requests=2 * RPM, concurrency=CONCURRENCY, latency=LATENCY)
    assert run.seconds >= 0.95 * (2 * RPM) / (RPM / 60)


def test_a_per_second_server_makes_the_budget_fall_back_after_a_handful_of_429s(make_limiter):
    limiter, clock = make_limiter(RPM)
    server = ServerBudget(rpm=RPM, tpm=None, burst_seconds=1.0, model="per-second")
    requests = 2 * RPM
    run = simulate(limiter, server, clock, requests=requests, concurrency=CONCURRENCY, latency=LATENCY)

    # A handful of refusals while it probes, then none: steady pacing fits every second.
    assert len(run.refused_at) <= 3, run.refused_at
    assert max(run.refused_at) <= 5, run.refused_at
    ideal = requests / (RPM / 60)
    assert run.seconds <= 1.05 * ideal, f"{run.seconds:.1f} s for an ideal of {ideal:.1f} s"
    assert limiter.quantized(KEY) and run.quantized_at <= max(run.refused_at)


def test_a_429_with_room_left_marks_the_budget_quantized_for_every_worker(make_limiter):
    first, clock = make_limiter()
    second, _ = make_limiter()
    headers = {"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "2900"}
    first.observe(KEY, headers)
    clock.advance(1)
    first.observe(KEY, headers)
    assert second.burst(KEY) > 0.5  # the headroom grew: 2,900 requests reported left

    second.observe(KEY, headers)  # the 429's own headers
    second.cool_down(KEY, 1.0)
    assert first.quantized(KEY) and first.burst(KEY) == 0.5
    # After the pause: one request, then the rate (50 per second), no burst.
    assert first.reserve(KEY, 0) == pytest.approx(1.0)
    clock.advance(1.0)
    assert first.reserve(KEY, 0) == 0.0
    assert first.reserve(KEY, 0) == pytest.approx(0.02)
    # More evidence of room no longer grows the burst.
    clock.advance(5)
    first.observe(KEY, headers)
    clock.advance(5)
    first.observe(KEY, headers)
    assert first.burst(KEY) == 0.5


def test_a_429_from_an_empty_bucket_keeps_the_headroom_and_resumes_at_the_rate(make_limiter):
    limiter, clock = make_limiter()
    room = {"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "2900"}
    limiter.observe(KEY, room)
    clock.advance(10)
    limiter.observe(KEY, room)
    limiter.observe(KEY, {"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "0"})
    limiter.cool_down(KEY, 0.02)
    assert not limiter.quantized(KEY)
    assert limiter.burst(KEY) > 0.5
    # The bucket is empty: after the pause the refill rate, not the learnt burst.
    clock.advance(0.02)
    assert limiter.reserve(KEY, 0) == 0.0
    assert limiter.reserve(KEY, 0) == pytest.approx(0.02)


def test_headroom_never_exceeds_what_the_provider_reported(make_limiter):
    limiter, clock = make_limiter()
    headers = {"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "300"}
    for _ in range(400):  # one request's worth (20 ms) per response: 8 s of growth, capped at 6
        limiter.observe(KEY, headers)
        clock.advance(0.1)
    assert limiter.burst(KEY) == pytest.approx(300 / 50)
    granted = 0
    while limiter.reserve(KEY, 0) == 0.0:
        granted += 1
    assert granted == 300


def test_headroom_off_keeps_the_nominal_burst(make_limiter):
    limiter, clock = make_limiter(headroom=False)
    headers = {"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "3000"}
    for _ in range(5):
        limiter.observe(KEY, headers)
        clock.advance(10)
    assert limiter.burst(KEY) == 0.5
    granted = 0
    while limiter.reserve(KEY, 0) == 0.0:
        granted += 1
    assert granted == 25
