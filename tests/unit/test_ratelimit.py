"""The shared limiter on fakeredis (real Lua), driven by a simulated clock unless said otherwise."""

import collections
import logging
import random
import time
import uuid

import fakeredis
import pytest

from worker.ratelimit import IDLE_EXPIRY_SECONDS, Limiter, Limits, NullLimiter, RateLimiter

MINUTE_US = 60_000_000
KEY = "gpt-test:abc123"
UNCONSTRAINED = 10**9  # a limit that never binds, to isolate the other dimension


class SimClock:
    """Whole microseconds, so that window arithmetic in the tests is exact."""

    def __init__(self, start_us: int = 1_700_000_000_000_000):
        self.us = start_us

    def seconds(self) -> float:
        return self.us / 1_000_000

    def advance(self, seconds: float) -> None:
        self.us += round(seconds * 1_000_000)


@pytest.fixture
def server():
    return fakeredis.FakeServer()


@pytest.fixture
def clock():
    return SimClock()


@pytest.fixture
def make_limiter(server, clock):
    namespace = f"test:{uuid.uuid4().hex}"

    def make(**options) -> RateLimiter:
        options.setdefault("clock", clock.seconds)
        return RateLimiter(fakeredis.FakeRedis(server=server), namespace=namespace, **options)

    return make


def configured(limiter: RateLimiter, rpm: int | None, tpm: int | None, key: str = KEY) -> RateLimiter:
    limiter.configure(key, Limits(rpm=rpm, tpm=tpm))
    return limiter


def grants_at_one_instant(limiter: RateLimiter, tokens: int, key: str = KEY) -> int:
    granted = 0
    while limiter.reserve(key, tokens) == 0.0:
        granted += 1
        assert granted < 100_000, "the limiter never refused"
    return granted


def greedy(limiter: RateLimiter, clock: SimClock, costs, key: str = KEY) -> list[tuple[int, int]]:
    """One caller that retries exactly when told: returns (time_us, tokens) of each grant."""
    grants, attempts = [], 0
    for cost in costs:
        while (wait := limiter.reserve(key, cost)) > 0:
            clock.advance(wait)
            attempts += 1
            assert attempts <= 10 * len(costs), "the limiter keeps refusing"
        grants.append((clock.us, cost))
    return grants


def max_in_window(grants: list[tuple[int, int]], window_us: int = MINUTE_US, *, tokens: bool = False) -> int:
    """The most requests (or tokens) granted in any closed window of `window_us`."""
    best = total = start = 0
    for end_time, cost in grants:
        total += cost if tokens else 1
        while end_time - grants[start][0] > window_us:
            total -= grants[start][1] if tokens else 1
            start += 1
        best = max(best, total)
    return best


def state(server, limiter: RateLimiter, key: str = KEY) -> dict:
    return fakeredis.FakeRedis(server=server).hgetall(limiter.redis_key(key))


# --- pacing and the window guarantee -----------------------------------------------------------


def test_paces_requests_at_the_rate_and_never_beyond_rpm_plus_burst(make_limiter, clock):
    limiter = configured(make_limiter(), rpm=600, tpm=UNCONSTRAINED)
    grants = greedy(limiter, clock, [1] * 1000)

    times = [t for t, _ in grants]
    assert times[:10] == [times[0]] * 10  # the burst: 1 s worth of 10/s
    steady = [b - a for a, b in zip(times[10:], times[11:])]
    assert steady == [100_000] * len(steady)  # then exactly one every 0.1 s
    assert max_in_window(grants) == 600 + 10


def test_a_new_budget_admits_no_more_than_its_limit_plus_burst_in_its_first_minute(make_limiter, clock):
    limiter = configured(make_limiter(), rpm=600, tpm=UNCONSTRAINED)
    start = clock.us
    grants = greedy(limiter, clock, [1] * 700)
    first_minute = [g for g in grants if g[0] - start <= MINUTE_US]
    assert 600 <= len(first_minute) <= 600 + 10


def test_token_budget_dominates_when_tokens_are_the_constraint(make_limiter, clock):
    # 10 requests/s allowed, but 100 tokens/s: 100-token requests go at 1/s.
    limiter = configured(make_limiter(), rpm=600, tpm=6_000)
    grants = greedy(limiter, clock, [100] * 200)

    assert (grants[-1][0] - grants[1][0]) / (len(grants) - 2) == 1_000_000
    assert max_in_window(grants, tokens=True) <= 6_000 + 100 + 100
    assert max_in_window(grants) <= 62


def random_callers(limiters, clock, rng, max_cost: int, callers: int = 6) -> list[tuple[int, int]]:
    """`callers` callers spread over the limiters (several processes) ask for random costs for three
    simulated minutes, retrying after the wait they are told; the (time in µs, cost) of each grant."""
    next_try = [clock.us + rng.randrange(1_000_000) for _ in range(callers)]
    end = clock.us + 3 * MINUTE_US
    grants = []
    while next_try[caller := min(range(callers), key=next_try.__getitem__)] < end:
        clock.us = next_try[caller]
        cost = rng.randint(1, max_cost)
        wait = limiters[caller % len(limiters)].reserve(KEY, cost)
        if wait == 0:
            grants.append((clock.us, cost))
            next_try[caller] = clock.us + rng.randrange(50_000)
        else:
            next_try[caller] = clock.us + round(wait * 1_000_000) + rng.randrange(20_000)
    return grants


@pytest.mark.parametrize("seed", range(3))

@pytest.mark.parametrize(
    ("rpm", "tpm", "max_cost"),
    [(600, 60_000, 400), (600, 600_000, 50), (120, 30_000, 3_000)],
    ids=["token-bound", "request-bound", "mostly-beyond-the-token-burst"],
)
def test_many_random_callers_never_exceed_the_window_bounds(make_limiter, clock, seed, rpm, tpm, max_cost):
    rng = random.Random(seed)
    limiters = [configured(make_limiter(), rpm, tpm) for _ in range(3)]  # several processes
    start = clock.us
    grants = random_callers(limiters, clock, rng, max_cost)
    end = start + 3 * MINUTE_US

    burst_requests, burst_tokens = max(rpm // 60, 1), tpm // 60
    assert max_in_window(grants) <= rpm + burst_requests
    assert max_in_window(grants, tokens=True) <= tpm + burst_tokens + max(c for _, c in grants)
    # and the budget is used: one dimension or the other runs near its full rate
    minutes = (end - start) / MINUTE_US
    used = max(len(grants) / (rpm * minutes), sum(c for _, c in grants) / (tpm * minutes))
    assert used >= 0.95


def test_a_request_bigger_than_the_burst_is_still_admitted(make_limiter, clock):
    limiter = configured(make_limiter(), rpm=UNCONSTRAINED, tpm=6_000)  # 100 tokens/s, burst 100
    assert limiter.reserve(KEY, 50_000) == 0.0
    # ...and everyone after it waits for its 500 s, less the tolerance of 1 s minus one token
    assert limiter.reserve(KEY, 1) == pytest.approx(500 - 0.99)


def test_a_big_request_competes_on_equal_terms_with_small_ones(make_limiter, clock):
    limiter = configured(make_limiter(), rpm=UNCONSTRAINED, tpm=6_000)
    assert grants_at_one_instant(limiter, 10) == 10
    wait = limiter.reserve(KEY, 50_000)
    assert wait == pytest.approx(0.01)  # the same wait as a small request
    clock.advance(wait)
    assert limiter.reserve(KEY, 50_000) == 0.0


def test_rounding_never_hands_out_budget(make_limiter):
    limiter = configured(make_limiter(), rpm=UNCONSTRAINED, tpm=7)  # 8,571,428.57 us per token
    assert limiter.reserve(KEY, 1) == 0.0
    assert limiter.reserve(KEY, 1) == 8.571429  # rounded up to the next microsecond


def test_a_dimension_with_no_limit_does_not_constrain(make_limiter):
    limiter = make_limiter(fallback=Limits(rpm=600, tpm=None))
    assert limiter.limits(KEY) == Limits(rpm=600, tpm=None)
    assert grants_at_one_instant(limiter, 10**12) == 10


# --- sharing, denial, settle ---------------------------------------------------------------------


def test_two_limiters_on_one_server_share_one_budget(make_limiter, clock):
    first = configured(make_limiter(), rpm=600, tpm=UNCONSTRAINED)
    second = configured(make_limiter(), rpm=600, tpm=UNCONSTRAINED)
    granted = 0
    for _ in range(10):
        granted += first.reserve(KEY, 1) == 0.0
        granted += second.reserve(KEY, 1) == 0.0
    assert granted == 10
    assert second.reserve(KEY, 1) == pytest.approx(0.1)
    assert first.reserve("another-model:abc123", 1) == 0.0  # budgets are separate per key


def test_a_denial_takes_nothing(make_limiter, server, clock):
    limiter = configured(make_limiter(), rpm=600, tpm=6_000)
    assert limiter.reserve(KEY, 100) == 0.0  # the token burst is used up, requests are not
    before = state(server, limiter)
    waits = {limiter.reserve(KEY, 100) for _ in range(50)}
    assert waits == {0.01}
    assert state(server, limiter) == before
    clock.advance(0.01)
    assert limiter.reserve(KEY, 100) == 0.0


def test_the_longer_wait_is_returned(make_limiter, clock):
    limiter = configured(make_limiter(), rpm=60, tpm=6_000)  # 1 request/s, 100 tokens/s
    assert limiter.reserve(KEY, 500) == 0.0
    assert limiter.reserve(KEY, 1) == pytest.approx(5 - 0.99)  # tokens: 5 s; requests: 1 s


@pytest.fixture
def token_limiter(make_limiter):
    """100 tokens/s, burst 1 s; requests do not bind."""
    return configured(make_limiter(), rpm=UNCONSTRAINED, tpm=6_000)


def test_settle_refunds_unused_tokens(token_limiter):
    assert token_limiter.reserve(KEY, 1_000) == 0.0
    assert token_limiter.reserve(KEY, 1) == pytest.approx(10 - 0.99)
    token_limiter.settle(KEY, reserved_tokens=1_000, actual_tokens=200)
    assert token_limiter.reserve(KEY, 1) == pytest.approx(2 - 0.99)


def test_settle_charges_extra_tokens(token_limiter):
    assert token_limiter.reserve(KEY, 1_000) == 0.0
    token_limiter.settle(KEY, reserved_tokens=1_000, actual_tokens=1_500)
    assert token_limiter.reserve(KEY, 1) == pytest.approx(15 - 0.99)


def test_a_refund_never_banks_budget(token_limiter, clock):
    assert token_limiter.reserve(KEY, 1_000) == 0.0
    token_limiter.settle(KEY, 1_000, 0)
    assert grants_at_one_instant(token_limiter, 10) == 10  # not more than a fresh budget
    clock.advance(20)
    token_limiter.settle(KEY, 1_000, 0)  # a late refund, after the schedule has run out
    assert grants_at_one_instant(token_limiter, 10) == 10


# --- cool-down ---------------------------------------------------------------------------------


def test_cool_down_is_shared_and_never_shortened(make_limiter, clock):
    first, second = make_limiter(), make_limiter()
    first.cool_down(KEY, 30)
    assert second.reserve(KEY, 1) == 30.0
    clock.advance(10)
    first.cool_down(KEY, 5)
    assert second.reserve(KEY, 1) == 20.0
    second.cool_down(KEY, 25)
    assert first.reserve(KEY, 1) == 25.0
    clock.advance(25)
    assert first.reserve(KEY, 1) == 0.0


def test_cool_down_rejects_nonsense(make_limiter):
    limiter = make_limiter()
    for seconds in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            limiter.cool_down(KEY, seconds)


# --- limits: configured > learnt > fallback; learning from headers -------------------------------


def test_fallback_applies_until_something_is_known(make_limiter):
    limiter = make_limiter(fallback=Limits(rpm=30, tpm=9_000))
    assert limiter.limits(KEY) == Limits(rpm=30, tpm=9_000)


def test_limits_are_learnt_from_headers_and_shared(make_limiter):
    first, second = make_limiter(), make_limiter()
    first.observe(KEY, {"X-RateLimit-Limit-Requests": "500", "x-ratelimit-limit-tokens": "200000"})
    assert second.limits(KEY) == Limits(rpm=500, tpm=200_000)


def test_configured_limits_beat_learnt_ones(make_limiter):
    headers = {"x-ratelimit-limit-requests": "1200", "x-ratelimit-limit-tokens": "50000"}
    learner, configured_one = make_limiter(), make_limiter()
    configured_one.configure(KEY, Limits(rpm=600))
    configured_one.configure("other:abc123", Limits(rpm=600))
    for key in (KEY, "other:abc123"):
        learner.observe(key, headers)

    assert learner.limits(KEY) == Limits(rpm=1200, tpm=50_000)
    assert configured_one.limits(KEY) == Limits(rpm=600, tpm=50_000)
    # and the schedules follow: the configured 600 rpm gives a burst of 10, the learnt 1200 rpm
    # gives 20 (and the fallback's 60 rpm would give 1)
    assert grants_at_one_instant(configured_one, 1) == 10
    assert grants_at_one_instant(learner, 1, key="other:abc123") == 20


def test_when_fewer_remain_than_our_burst_we_admit_only_those(make_limiter, clock):
    limiter = configured(make_limiter(), rpm=600, tpm=UNCONSTRAINED)  # a burst of 10
    limiter.observe(KEY, {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "3"})
    assert grants_at_one_instant(limiter, 1) == 3
    assert limiter.reserve(KEY, 1) == 0.1  # then the rate resumes


def test_remaining_tokens_tighten_the_token_schedule(make_limiter):
    limiter = configured(make_limiter(), rpm=UNCONSTRAINED, tpm=150_000)  # 2,500 tokens/s and burst
    limiter.observe(KEY, {"x-ratelimit-limit-tokens": "150000", "x-ratelimit-remaining-tokens": "500"})
    assert limiter.reserve(KEY, 500) == 0.0
    assert limiter.reserve(KEY, 1) == 0.0004  # one token's interval


@pytest.mark.parametrize("remaining", ["10", "600", "100000"])
def test_remaining_beyond_our_burst_changes_nothing(make_limiter, remaining):
    limiter = configured(make_limiter(), rpm=600, tpm=UNCONSTRAINED)
    limiter.observe(KEY, {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": remaining})
    assert grants_at_one_instant(limiter, 1) == 10


def test_headers_never_pull_the_schedule_earlier(token_limiter):
    assert token_limiter.reserve(KEY, 10_000) == 0.0  # our schedule: 100 s ahead
    token_limiter.observe(KEY, {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "6000"})
    assert token_limiter.reserve(KEY, 1) == pytest.approx(100 - 0.99)


class SlidingWindowProvider:
    """A provider that admits at most `limit` requests in any 60 s and reports what is left."""

    def __init__(self, limit: int, clock: SimClock):
        self.limit, self.clock, self.accepted = limit, clock, collections.deque()

    def send(self) -> bool:
        self._forget_old()
        if len(self.accepted) >= self.limit:
            return False
        self.accepted.append(self.clock.us)
        return True

    def headers(self) -> dict[str, str]:
        self._forget_old()
        used = len(self.accepted)
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.limit - used),
            "x-ratelimit-reset-requests": f"{used * 60 / self.limit:.3f}s",
        }

    def _forget_old(self) -> None:
        while self.accepted and self.accepted[0] <= self.clock.us - MINUTE_US:
            self.accepted.popleft()


def test_observing_a_full_window_while_pacing_at_the_limit_keeps_full_speed(make_limiter, clock):
    # At exactly the limit a sliding-window provider reports about 0 remaining: that is our own
    # last minute, not a backlog to wait out. Headroom off: such a provider's `remaining` is not
    # a bucket that refills continuously (GRIDTUNE_HEADROOM=0 is the setting for it).
    limiter = make_limiter(fallback=Limits(rpm=None, tpm=None), headroom=False)
    provider = SlidingWindowProvider(600, clock)
    limiter.observe(KEY, provider.headers())
    start = clock.us
    accepted, refused_at = [], []
    while clock.us < start + 3 * MINUTE_US:
        if (wait := limiter.reserve(KEY, 1)) > 0:
            clock.advance(wait)
            continue
        (accepted if provider.send() else refused_at).append(clock.us)
        limiter.observe(KEY, provider.headers())
        assert len(accepted) + len(refused_at) < 5_000, "the limiter admits without pacing"

    last_minute = [t for t in accepted if t >= start + 2 * MINUTE_US]
    assert len(last_minute) >= 599
    # Only our first-minute burst overshoots the provider's window; after that we follow it.
    assert len(refused_at) <= 10
    assert all(t <= start + MINUTE_US for t in refused_at)


@pytest.mark.parametrize(
    "headers",
    [
        {
            "x-ratelimit-limit-requests": "lots",
            "x-ratelimit-remaining-requests": "-3",
            "x-ratelimit-reset-requests": "soon",
            "x-ratelimit-limit-tokens": "",
            "x-ratelimit-remaining-tokens": "1e3",
            "x-ratelimit-reset-tokens": "5 s",
        },
        {"x-ratelimit-limit-requests": "0", "x-ratelimit-limit-tokens": "-100"},
        {"x-ratelimit-limit-requests": "12.5", "x-ratelimit-limit-tokens": "1_000", "x-ratelimit-remaining-tokens": "+5"},
        {"x-ratelimit-limit-requests": "1" * 16, "x-ratelimit-limit-tokens": "\u0661\u0662"},  # Arabic-Indic digits
    ],
)
def test_malformed_headers_are_ignored(make_limiter, server, headers, caplog):
    limiter = make_limiter()
    with caplog.at_level(logging.DEBUG, logger="worker.ratelimit"):
        limiter.observe(KEY, headers)
    assert state(server, limiter) == {}
    assert limiter.limits(KEY) == Limits(rpm=60, tpm=60_000)
    assert any("malformed" in record.getMessage() for record in caplog.records)


def test_a_malformed_remaining_keeps_the_limit_but_does_not_tighten(make_limiter):
    limiter = configured(make_limiter(), rpm=UNCONSTRAINED, tpm=None)
    limiter.observe(KEY, {"x-ratelimit-limit-tokens": "90000", "x-ratelimit-remaining-tokens": "none"})
    assert limiter.limits(KEY).tpm == 90_000
    assert grants_at_one_instant(limiter, 100) == 15  # a full burst: 1 s of 90,000/min


def test_no_headers_no_state(make_limiter, server):
    limiter = make_limiter()
    limiter.observe(KEY, {"content-type": "application/json"})
    assert state(server, limiter) == {}


def test_a_response_without_rate_headers_costs_no_round_trip(make_limiter, monkeypatch):
    # A local or self-hosted server sends no x-ratelimit headers: observe must not call Redis
    # (one script call per row at hundreds of rows per second), and a metered one still does.
    limiter = make_limiter()
    calls = []
    run = limiter._run
    monkeypatch.setattr(limiter, "_run", lambda script, *args: calls.append(script) or run(script, *args))
    limiter.observe(KEY, {"content-type": "application/json", "x-request-id": "abc"})
    assert calls == []
    limiter.observe(KEY, {"x-ratelimit-limit-requests": "500"})
    assert calls == ["observe"]
    assert limiter.limits(KEY).rpm == 500


# --- expiry ------------------------------------------------------------------------------------


def test_every_key_expires_but_not_before_its_schedule_runs_out(make_limiter, server):
    limiter = configured(make_limiter(), rpm=UNCONSTRAINED, tpm=6_000)
    limiter.reserve(KEY, 50_000)  # schedule 500 s ahead
    limiter.settle(KEY, 50_000, 60_000)  # 600 s
    limiter.observe("learnt-only:abc123", {"x-ratelimit-limit-tokens": "1000"})
    limiter.cool_down("cooling:abc123", 3_600)

    client = fakeredis.FakeRedis(server=server)
    ttls = {key.decode(): client.pttl(key) for key in client.scan_iter(match=limiter.redis_key("*"))}
    idle_ms = IDLE_EXPIRY_SECONDS * 1000
    assert ttls == {
        limiter.redis_key(KEY): pytest.approx(idle_ms + 600_000, abs=2_000),
        limiter.redis_key("learnt-only:abc123"): pytest.approx(idle_ms, abs=2_000),
        limiter.redis_key("cooling:abc123"): pytest.approx(idle_ms + 3_600_000, abs=2_000),
    }


def test_an_idle_budget_disappears(server):
    limiter = RateLimiter(fakeredis.FakeRedis(server=server), namespace=f"test:{uuid.uuid4().hex}", idle_expiry=0.2)
    limiter.configure(KEY, Limits(rpm=600, tpm=UNCONSTRAINED))
    client = fakeredis.FakeRedis(server=server)
    assert limiter.reserve(KEY, 1) == 0.0
    assert client.exists(limiter.redis_key(KEY))
    deadline = time.monotonic() + 5
    while client.exists(limiter.redis_key(KEY)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not client.exists(limiter.redis_key(KEY))


# --- the real clock, the stub, argument checks ---------------------------------------------------


def test_redis_time_is_the_default_clock(server):
    limiter = RateLimiter(fakeredis.FakeRedis(server=server), namespace=f"test:{uuid.uuid4().hex}")
    limiter.configure(KEY, Limits(rpm=600, tpm=UNCONSTRAINED))
    started = time.monotonic()
    granted = sum(limiter.reserve(KEY, 1) == 0.0 for _ in range(30))
    elapsed = time.monotonic() - started
    assert 10 <= granted <= 10 + elapsed / 0.1 + 1


def test_null_limiter_never_limits():
    limiter = NullLimiter()
    assert isinstance(limiter, Limiter)
    limiter.configure(KEY, Limits(rpm=1))
    limiter.cool_down(KEY, 60)
    limiter.observe(KEY, {"x-ratelimit-limit-requests": "1"})
    limiter.settle(KEY, 1, 10**9)
    assert [limiter.reserve(KEY, 10**9) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.limits(KEY) == Limits()


@pytest.mark.parametrize("fields", [{"rpm": 0}, {"tpm": -5}, {"rpm": 1.5}, {"tpm": True}, {"rpm": "60"}])
def test_limits_must_be_positive_ints(fields):
    with pytest.raises(ValueError):
        Limits(**fields)


def test_argument_checks(make_limiter):
    with pytest.raises(ValueError):
        make_limiter(burst_seconds=0)
    limiter = make_limiter()
    with pytest.raises(ValueError):
        limiter.reserve(KEY, -1)
    with pytest.raises(ValueError):
        limiter.reserve("", 1)
