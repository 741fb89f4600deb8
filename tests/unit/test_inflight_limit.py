"""The shared in-flight limit (worker/ratelimit/concurrency.py), driven by a simulated clock and
scripted servers: real Lua on fakeredis (embedded mode) and on the real Redis (workers)."""

from __future__ import annotations

import heapq
import random
import statistics
import threading
import time
import uuid

import fakeredis
import pytest
import redis

from worker.ratelimit.concurrency import InFlightLimiter, Lease, is_metered

KEY = "smollm2-135m:abc123"


class SimClock:
    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def seconds(self) -> float:
        return self.now


@pytest.fixture(params=["fakeredis", "redis"])
def client(request):
    if request.param == "fakeredis":
        return fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return redis.Redis.from_url(request.getfixturevalue("redis_db"))


@pytest.fixture
def clock():
    return SimClock()


def _maker(client, clock):
    namespace = f"test:{uuid.uuid4().hex}"

    def make(**options) -> InFlightLimiter:
        options.setdefault("clock", clock.seconds)
        options.setdefault("rng", random.Random(0))
        return InFlightLimiter(client, namespace=namespace, **options)

    return make


@pytest.fixture
def make(client, clock):
    return _maker(client, clock)


@pytest.fixture
def make_on_redis(redis_db, clock):
    """Simulations make thousands of script calls: on the real Redis only (fakeredis' Lua is slow)."""
    return _maker(redis.Redis.from_url(redis_db), clock)


def sharing_server(capacity: int, work: float, jitter: float = 0.0, seed: int = 0):
    """Latency of a request that starts with `n` in service (itself included): processor sharing,
    fixed at the start (the scripted form of localapi's overload mode)."""
    rng = random.Random(seed)

    def latency(n: int) -> float:
        return work * max(1.0, n / capacity) * (1 + rng.uniform(-jitter, jitter))

    return latency


def simulate(limiters: list[InFlightLimiter], clock: SimClock, latency_of, *, callers: int = 64,
             seconds: float = 120.0, cap: int | None = None, warm_up: float = 30.0):
    """`callers` worker threads (spread over the `limiters`, one per process) each send one request
    after another through the shared limit. Returns (latencies, completed) after `warm_up`."""
    start = clock.now
    events = [(start, i, "ask", None) for i in range(callers)]
    heapq.heapify(events)
    in_service = 0
    latencies, completed = [], 0
    while events:
        if events[0][0] > start + seconds:
            break
        at, caller, kind, lease = heapq.heappop(events)
        clock.now = at
        limiter = limiters[caller % len(limiters)]
        if kind == "ask":
            lease, wait = limiter.acquire(KEY, cap)
            if lease is None:
                heapq.heappush(events, (at + wait, caller, "ask", None))
                continue
            in_service += 1
            took = latency_of(in_service)
            heapq.heappush(events, (at + took, caller, ("done", took), lease))
        else:
            in_service -= 1
            took = kind[1]
            limiter.release(lease, latency=took, outcome="ok")
            if at >= start + warm_up:
                latencies.append(took)
                completed += 1
            heapq.heappush(events, (at, caller, "ask", None))
    for _, caller, kind, lease in events:  # the end: requests still out give their slots back
        if lease is not None:
            limiters[caller % len(limiters)].release(lease, outcome="other")
    return latencies, completed


def test_the_limit_finds_the_servers_capacity_and_latency_stays_near_unloaded(make_on_redis, clock):
    make = make_on_redis
    # 4 worker processes, 64 threads, a server that serves 8 at full speed (0.5 s each).
    limiters = [make() for _ in range(4)]
    latencies, completed = simulate(limiters, clock, sharing_server(8, 0.5), seconds=120, warm_up=40)
    full_throughput = 8 / 0.5 * 80  # requests in the 80 s after warm-up
    assert completed >= 0.95 * full_throughput
    # Within the tolerance (1.3), not just the 1.5: the limit grows only while latency
    # is near the unloaded one, and holds between that and the tolerance (without the band it
    # grows to the tolerance, overshoots by one and sits at ~1.4x).
    assert statistics.median(latencies) <= 1.3 * 0.5
    state = limiters[0].state(KEY)
    assert 8 <= state["limit"] <= 12
    assert state["base_s"] == pytest.approx(0.5, rel=0.05)


def test_without_the_limit_the_same_server_queues_the_latency_up():
    # The control for the test above: with no limit, latency is 64/8 = 8x unloaded.
    latency = sharing_server(8, 0.5)
    assert latency(64) == 8 * latency(1)


def test_noisy_latency_neither_collapses_nor_inflates_the_limit(make_on_redis, clock):
    make = make_on_redis
    limiters = [make() for _ in range(2)]
    latencies, completed = simulate(limiters, clock, sharing_server(16, 0.5, jitter=0.3, seed=1), seconds=60, warm_up=20)
    assert completed >= 0.85 * 16 / 0.5 * 40
    assert statistics.median(latencies) <= 1.5 * 0.5


def test_a_limit_that_is_not_used_does_not_grow(make_on_redis, clock):
    make = make_on_redis
    # Two callers only: the limit must not climb towards 1000 while the server is idle.
    limiter = make()
    simulate([limiter], clock, sharing_server(100, 0.2), callers=2, seconds=60)
    assert limiter.state(KEY)["limit"] <= 2 * 2 + 1


def test_a_timeout_cuts_the_limit_for_every_worker_and_keeps_the_abandoned_slot(make_on_redis, clock):
    make = make_on_redis
    first, second = make(), make()
    simulate([first, second], clock, sharing_server(8, 0.5), seconds=30)
    before = first.state(KEY)["limit"]
    lease, _ = first.acquire(KEY)
    assert lease is not None and lease.token
    clock.now += 60  # the request times out
    first.release(lease, outcome="overload")
    assert second.state(KEY)["limit"] == pytest.approx(before / 2, rel=0.01)
    # The server still generates the abandoned answer: its slot counts for one more latency.
    assert second.state(KEY)["in_flight"] == 1
    granted = []
    while (lease := second.acquire(KEY)[0]) is not None:
        granted.append(lease)
    assert len(granted) == int(before / 2) - 1
    # A burst of timeouts (all the requests that were queued) cuts once per latency, not to 1.
    for lease in granted:
        second.release(lease, outcome="overload")
    assert second.state(KEY)["limit"] == pytest.approx(before / 2, rel=0.01)


def test_a_server_that_became_slower_is_relearnt_instead_of_starved(make_on_redis, clock):
    make = make_on_redis
    limiter = make()
    simulate([limiter], clock, sharing_server(8, 0.5), seconds=30)
    # The same server now takes 3x longer for everything (longer answers, another tenant).
    latencies, completed = simulate([limiter], clock, sharing_server(8, 1.5), seconds=150, warm_up=75)
    assert completed >= 0.85 * 8 / 1.5 * 75
    assert limiter.state(KEY)["base_s"] == pytest.approx(1.5, rel=0.1)


def test_a_fixed_cap_holds_whether_or_not_the_limit_adapts(make, clock):
    for adaptive in (False, True):
        limiter = make(adaptive=adaptive)
        key = f"{KEY}:{adaptive}"
        held, _ = limiter.acquire(key, cap=1)
        assert held is not None and held.token
        refused, wait = limiter.acquire(key, cap=1)
        assert refused is None and wait > 0
        limiter.release(held, latency=0.1, outcome="ok", cap=1)
        assert limiter.acquire(key, cap=1)[0] is not None


def test_with_the_adaptive_limit_off_and_no_cap_nothing_is_held(make, client):
    limiter = make(adaptive=False)
    lease, wait = limiter.acquire(KEY)
    assert lease == Lease(KEY, None) and wait == 0
    assert limiter.state(KEY)["in_flight"] == 0


def test_a_crashed_workers_slot_frees_at_its_lease_expiry(make, clock):
    limiter = make(lease_seconds=90)
    held, _ = limiter.acquire(KEY)  # the slow-start limit is 1: this worker then dies
    assert held is not None and held.token
    assert limiter.acquire(KEY)[0] is None
    clock.now += 89
    assert limiter.acquire(KEY)[0] is None
    clock.now += 2
    assert limiter.acquire(KEY)[0] is not None


def test_a_metered_endpoint_is_left_to_the_rate_budget(make, client):
    first, second = make(), make()
    lease, _ = first.acquire(KEY)
    first.release(lease, latency=0.5, outcome="ok", metered=True)
    # This process no longer asks Redis; the others learn it from the shared state.
    assert [first.acquire(KEY)[0].token for _ in range(3)] == [None] * 3
    assert all(second.acquire(KEY)[0] == Lease(KEY, None) for _ in range(100))
    assert first.acquire(KEY, cap=2)[0].token is not None  # a configured cap still holds


def test_waiters_are_spaced_so_polls_stay_near_one_per_answer(make, clock):
    limiter = make(rng=random.Random(0), max_wait=100, adaptive=False)
    holders = [limiter.acquire(KEY, cap=2)[0] for _ in range(2)]
    assert all(holders)
    waits = [limiter.acquire(KEY, cap=2)[1] for _ in range(20)]
    # No latency known yet (0.1 s assumed): the first waiter hears about 0.1 s / 2 slots, the
    # 20th about 20 x that (each +-50 % jitter).
    assert waits[0] < 0.1 and waits[-1] > 0.4


def _wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_released_slot_goes_to_a_blocked_waiter_at_once_not_at_its_next_poll(make, client):
    # Real time (take blocks on Redis). Answers take 5 s here, so a poll would come seconds later.
    limiter = make(clock=None, adaptive=False, max_wait=10)
    for _ in range(5):
        lease = limiter.take(KEY, cap=1)
        limiter.release(lease, latency=5.0, outcome="ok", cap=1)
    held = limiter.take(KEY, cap=1)
    assert limiter.acquire(KEY, cap=1)[1] >= 2  # what the waiter would otherwise sleep
    waiters = limiter.keys(KEY)[2]
    got, taken = {}, threading.Event()

    def waiter():
        got["lease"] = limiter.take(KEY, cap=1, deadline=time.monotonic() + 30)
        got["at"] = time.monotonic()
        taken.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: client.zcard(waiters) == 2)  # the probe above and the waiter
        released = time.monotonic()
        limiter.release(held, latency=5.0, outcome="ok", cap=1)
        # Polling would take seconds; 0.1 s leaves room for a loaded CI machine (typically ~2-7 ms).
        assert taken.wait(timeout=1) and got["at"] - released < 0.1
        assert got["lease"].token and limiter.state(KEY)["in_flight"] == 1
    finally:
        if "lease" not in got:  # a failure: free the thread's way out (it gives up at its deadline)
            client.delete(limiter.keys(KEY)[1])
            limiter.release(Lease(KEY, "nobody"), cap=1)
        thread.join(timeout=30)


def test_contending_threads_keep_every_slot_busy(make, client):
    # 10 threads, a cap of 4, a server that holds each request 0.5 s; after each answer a thread
    # stores it and fetches its next task (0.2 s) before asking again, so the releaser does not
    # simply take its own slot back. Polling left a freed slot idle until some waiter's next poll
    # (busy ~ 0.7 here); handed over, it is idle about one round trip.
    cap, hold, pause, seconds = 4, 0.5, 0.2, 3.0
    limiter = make(clock=None, adaptive=False)
    lock = threading.Lock()
    spans, in_service = [], [0, 0]  # [now, most at once]
    start = time.monotonic()
    end = start + seconds

    def caller():
        while time.monotonic() < end:
            lease = limiter.take(KEY, cap=cap, deadline=end + 10)
            began = time.monotonic()
            with lock:
                in_service[0] += 1
                in_service[1] = max(in_service)
            time.sleep(hold)  # the server answering
            with lock:
                in_service[0] -= 1
            spans.append((began, time.monotonic()))
            limiter.release(lease, latency=hold, outcome="ok", cap=cap)
            time.sleep(pause)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    window = (start + hold, end)  # after the first answers
    busy = sum(max(0.0, min(b, window[1]) - max(a, window[0])) for a, b in spans)
    assert in_service[1] == cap
    assert busy / (cap * (window[1] - window[0])) >= 0.95
    assert limiter.state(KEY)["in_flight"] == 0


def test_wake_up_tokens_never_pile_up(make, client):
    limiter = make(clock=None, adaptive=False)
    wakeups = limiter.keys(KEY)[4]
    # Nobody waits: releases push nothing.
    for _ in range(50):
        limiter.release(limiter.take(KEY, cap=2), latency=0.1, outcome="ok", cap=2)
    assert not client.exists(wakeups)
    # Three wait (refused, not popping): one token per slot freed for them, never more ...
    first, second = limiter.take(KEY, cap=2), limiter.take(KEY, cap=2)
    for _ in range(3):
        assert limiter.acquire(KEY, cap=2)[0] is None
    limiter.release(first, outcome="other", cap=2)
    assert client.llen(wakeups) == 1 and 0 < client.pttl(wakeups) <= 3600 * 1000
    limiter.release(second, outcome="other", cap=2)
    assert client.llen(wakeups) == 2
    # ... and none for a slot taken meanwhile (by a caller that did not wait) or cut away.
    third = limiter.acquire(KEY, cap=2)[0]
    assert client.llen(wakeups) == 1
    limiter.acquire(KEY, cap=2)
    assert client.llen(wakeups) == 0
    limiter.release(third, outcome="other", cap=1)  # the cap cut to 1: one still in flight
    assert not client.exists(wakeups)


def test_an_endpoint_found_metered_lets_its_waiters_go_at_once(make, client):
    first, second = make(clock=None), make(clock=None)
    held = first.take(KEY)  # the slow-start limit is 1
    assert second.acquire(KEY)[0] is None and second.acquire(KEY)[0] is None  # two wait
    first.release(held, latency=0.5, outcome="ok", metered=True)
    assert client.llen(first.keys(KEY)[4]) == 2  # no limit any more: a token each
    assert second.take(KEY) == Lease(KEY, None)


def test_take_gives_up_at_its_deadline_and_needs_the_real_clock(make, client):
    limiter = make(clock=None, adaptive=False, max_wait=10)
    held = limiter.take(KEY, cap=1)
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        limiter.take(KEY, cap=1, deadline=began + 0.2)
    assert 0.2 <= time.monotonic() - began < 1.0
    assert client.zcard(limiter.keys(KEY)[2]) == 0  # it no longer counts as waiting
    limiter.release(held, cap=1)
    with pytest.raises(RuntimeError):
        make().take(KEY)  # a simulated clock: poll with acquire


def test_is_metered_reads_the_rate_limit_headers():
    assert is_metered({"X-RateLimit-Limit-Requests": "3000"})
    assert is_metered({"x-ratelimit-limit-tokens": "1"})
    assert not is_metered({"content-type": "application/json"})
    assert not is_metered(None)


def test_bad_arguments_are_refused(make):
    with pytest.raises(ValueError):
        make(tolerance=1.0)
    limiter = make()
    with pytest.raises(ValueError):
        limiter.acquire(KEY, cap=0)
    with pytest.raises(ValueError):
        limiter.acquire("")


def test_timeouts_503_and_529_are_overload_signs_and_a_429_is_not():
    import httpx2
    import openai

    from worker import llm

    def status_error(status):
        request = httpx2.Request("POST", "http://x/v1/chat/completions")
        return openai.APIStatusError("m", response=httpx2.Response(status, request=request), body={"message": "m"})

    assert llm.classify(openai.APITimeoutError(httpx2.Request("POST", "http://x"))).overload
    assert llm.classify(status_error(503)).overload and llm.classify(status_error(529)).overload
    assert not llm.classify(status_error(500)).overload
    assert not llm.classify(status_error(429)).overload  # the rate budget's cool-down handles those
    assert not llm.classify(openai.APIConnectionError(request=httpx2.Request("POST", "http://x"))).overload


def test_max_in_flight_is_a_run_option_not_part_of_the_fingerprint():
    from gridtune.sweep import RUN_OPTIONS, ModelSettings

    assert "max_in_flight" in RUN_OPTIONS
    assert ModelSettings(max_in_flight=1).max_in_flight == 1
    with pytest.raises(ValueError):
        ModelSettings(max_in_flight=0)
