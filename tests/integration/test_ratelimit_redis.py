"""The shared limiter on the real Redis: several processes, the Redis clock, real expiry."""

import multiprocessing
import random
import time
import uuid

import fakeredis
import pytest
import redis

from worker.ratelimit import Limits, RateLimiter

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/15"
KEY = "gpt-test:abc123"
RPM = 1200  # 20/s; burst_seconds=1 gives a burst of 20
UNCONSTRAINED = 10**9


def connect() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5, socket_timeout=10)


@pytest.fixture
def namespace():
    client = connect()
    client.ping()  # an unreachable Redis fails the test here instead of skipping it
    namespace = f"gridtune:test:{uuid.uuid4().hex}"
    yield namespace
    keys = list(client.scan_iter(match=f"{namespace}:*"))
    if keys:
        client.delete(*keys)


def hammer(namespace: str, start, seconds: float, results) -> None:
    """One worker process: reserve as fast as the limiter allows until its deadline."""
    limiter = RateLimiter(connect(), namespace=namespace)
    limiter.configure(KEY, Limits(rpm=RPM, tpm=UNCONSTRAINED))
    start.wait(timeout=60)
    began = time.time()
    deadline = time.monotonic() + seconds
    granted = refused = 0
    while (left := deadline - time.monotonic()) > 0:
        wait = limiter.reserve(KEY, 1)
        if wait == 0:
            granted += 1
        else:
            refused += 1
            time.sleep(min(wait, left))
    results.put((granted, began, time.time(), refused))


def test_processes_on_the_redis_clock_share_one_budget_and_use_it(namespace):
    spawn = multiprocessing.get_context("spawn")
    processes, seconds = 4, 6.0
    start, results = spawn.Barrier(processes), spawn.Queue()
    workers = [spawn.Process(target=hammer, args=(namespace, start, seconds, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers)

    total = sum(granted for granted, _, _, _ in reports)
    elapsed = max(end for _, _, end, _ in reports) - min(began for _, began, _, _ in reports)
    rate, burst = RPM / 60, RPM / 60
    assert all(granted > 0 for granted, _, _, _ in reports), reports  # every process got a share
    assert total <= rate * elapsed + burst
    # Each process was held back: the budget they drew on was the shared one. (How close to the
    # full rate they get depends on the machine's load: measured in bench/, not asserted here.)
    assert all(refused > 0 for _, _, _, refused in reports), reports
    assert total >= burst


def scripted_session(limiter: RateLimiter, clock: list[float]) -> list:
    """A fixed mix of every operation on a simulated clock; returns what each one answered."""
    rng = random.Random(7)
    limiter.configure(KEY, Limits(rpm=600))
    answers, wait = [], 0.0
    for step in range(400):
        clock[0] += rng.choice([0, 0.001, 0.05, wait, wait])  # callers mostly retry when told
        tokens = rng.choice([1, 50, 800, 5_000])
        wait = limiter.reserve(KEY, tokens)
        answers.append(wait)
        if wait == 0 and step % 3 == 0:
            limiter.settle(KEY, tokens, rng.randint(0, 2 * tokens))
        if step % 50 == 0:
            limiter.observe(
                KEY,
                {
                    "x-ratelimit-limit-requests": "500",
                    "x-ratelimit-limit-tokens": "90000",
                    "x-ratelimit-remaining-tokens": str(rng.randint(0, 90_000)),
                    "x-ratelimit-reset-tokens": rng.choice(["1s", "2m59.56s", "20ms"]),
                },
            )
        if step == 200:
            limiter.cool_down(KEY, 2.5)
    answers.append(limiter.limits(KEY))
    return answers


def test_real_redis_decides_exactly_as_fakeredis(namespace):
    real_clock, fake_clock = [1_700_000_000.0], [1_700_000_000.0]
    real = RateLimiter(connect(), namespace=namespace, clock=lambda: real_clock[0])
    fake = RateLimiter(fakeredis.FakeRedis(), namespace=namespace, clock=lambda: fake_clock[0])
    real_answers = scripted_session(real, real_clock)
    assert real_answers == scripted_session(fake, fake_clock)
    assert 100 < sum(wait == 0 for wait in real_answers[:-1]) < 300  # both grants and refusals
    assert real.redis_key(KEY).encode() in set(connect().scan_iter(match=f"{namespace}:*"))


def test_budgets_expire_on_real_redis(namespace):
    limiter = RateLimiter(connect(), namespace=namespace, idle_expiry=0.3)
    limiter.configure(KEY, Limits(rpm=600, tpm=6_000))
    client = connect()
    assert limiter.reserve(KEY, 300) == 0.0  # the token schedule runs 3 s ahead
    assert 3_000 <= client.pttl(limiter.redis_key(KEY)) <= 3_300
    deadline = time.monotonic() + 15
    while client.exists(limiter.redis_key(KEY)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.exists(limiter.redis_key(KEY))


def test_cool_down_on_the_redis_clock_is_seen_by_another_client(namespace):
    first = RateLimiter(connect(), namespace=namespace)
    second = RateLimiter(connect(), namespace=namespace)
    first.cool_down(KEY, 30)
    assert 29 < second.reserve(KEY, 1) <= 30
    first.cool_down(KEY, 1)
    assert 29 < second.reserve(KEY, 1) <= 30


@pytest.mark.parametrize("model", ["token-bucket", "per-second"])
def test_headroom_on_real_redis_decides_exactly_as_fakeredis(namespace, model):
    from localapi.budget import RateLimiter as ServerBudget
    from tests.unit.test_ratelimit import SimClock
    from tests.unit.test_ratelimit_headroom import simulate

    runs = []
    for client in (connect(), fakeredis.FakeRedis()):
        clock = SimClock()
        limiter = RateLimiter(client, namespace=namespace, burst_seconds=0.5, fallback=Limits(), clock=clock.seconds)
        limiter.configure(KEY, Limits(rpm=300))
        server = ServerBudget(rpm=300, tpm=None, burst_seconds=1.0, model=model)
        runs.append((simulate(limiter, server, clock, requests=600, concurrency=6, latency=0.2),
                     limiter.quantized(KEY)))
    assert runs[0] == runs[1]
    run, quantized = runs[0]
    # The token bucket's minute is spent early (ideal 60.2 s); the per-second server is detected.
    assert quantized == (model == "per-second")
    assert run.seconds <= (1.05 * 60.2 if model == "token-bucket" else 1.05 * 120)
