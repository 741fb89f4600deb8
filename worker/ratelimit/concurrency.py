"""How many requests may be in flight at one endpoint, shared through Redis by every worker.

Rate limits (limiter.py) cover providers that meter and refuse (429). Self-hosted servers (vLLM,
Ollama, `transformers serve`, a small local model) do neither: they queue, and latency grows until
requests time out. This limiter gives them backpressure from latency:

    slots = InFlightLimiter(redis.Redis.from_url(url))
    lease = slots.take(key, cap=None)   # blocks until a slot is free (acquire: never blocks)
    started = time.monotonic(); response = call()
    slots.release(lease, latency=time.monotonic() - started, outcome="ok", metered=False)

A caller that finds no free slot waits on the endpoint's wake-up list (BLPOP), and `release` pushes
one token per slot it leaves free for a waiter, in the same script, so a freed slot goes to a
waiter within a round trip instead of at the waiter's next poll (polling left it idle about one
inter-completion time: throughput limit / (limit + 1) of the server's). The BLPOP times out after
the wait `acquire` suggests (about latency x waiters / limit, at most `max_wait`), so a lost
wake-up, a crashed releaser or an expired lease costs no more than polling did. Tokens never pile
up: every script leaves at most one per slot free for a waiter (none when nobody waits, none after
the slot was taken or the limit cut); a waiter woken for a slot that is gone just waits again.

The limit adapts like TCP Vegas / Netflix's concurrency-limits "gradient" limiter, with every
worker process and host feeding one shared state (a Lua script per call, `concurrency_*.lua`):

* the unloaded latency is the lowest EWMA of latency seen (and whatever one request alone takes);
* the limit starts at 1 and grows by one per answer (slow start: doubles per latency), then by
  one per latency's worth of answers, and only while at least half of it is in use;
* when the latency EWMA exceeds `tolerance` x the unloaded latency (and by more than
  `min_queue` seconds, below which queueing is noise), the limit is cut in proportion
  (limit x tolerance x unloaded / current, at most halved), at most once per latency;
* a timeout halves it (a timeout is a queue, not bad luck) and the abandoned request, which the
  server is still generating, keeps its slot for one more latency.

An endpoint whose answers carry `x-ratelimit-limit-*` headers is metered: the rate budget governs
it and no in-flight limit applies (no lease, one Redis call per request instead of two). A fixed
`cap` (config `max_in_flight`, `GRIDTUNE_MAX_IN_FLIGHT`) applies always, adaptive or not.

A slot is a lease with an expiry (`lease_seconds`, above the request timeout), so a worker that
dies mid-request frees its slot at that expiry. State expires after `idle_expiry` seconds unused.

Redis keys per endpoint (`keys()`), all under `{namespace}:{key}` and expiring together:
the state hash (limit, latencies learnt, metered), `:leases` (token -> expiry), `:waiters`
(token -> expiry: how many wait, to space polls and to size wake-ups), `:latencies` (the latest
answers' latencies) and `:wakeups` (the wake-up tokens that waiters BLPOP).
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import redis

from worker.ratelimit.limiter import lua_script
from worker.ratelimit.roundtrip import Reply, RoundTrip

Outcome = Literal["ok", "overload", "other"]
IDLE_EXPIRY_SECONDS = 3600
# The shortest pause between two polls for a slot, in seconds (the longest: `max_wait`).
MIN_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Lease:
    """A slot at `key`; `token` None = no limit applied, nothing is held."""

    key: str
    token: str | None


_SCRIPTS = {name: lua_script("concurrency_common", f"concurrency_{name}") for name in ("acquire", "release")}


def is_metered(headers: Mapping[str, str] | None) -> bool:
    """Whether a response says it is rate-metered (x-ratelimit-limit-requests / -tokens)."""
    if not headers:
        return False
    names = {name.lower() for name in headers.keys()}
    return "x-ratelimit-limit-requests" in names or "x-ratelimit-limit-tokens" in names


class InFlightLimiter:
    """Leases on in-flight slots per endpoint `key`, with an adaptive limit (see the module doc).

    `tolerance` (> 1): latency / unloaded latency that counts as queueing. `min_queue` (seconds):
    queueing below this is never acted on. `lease_seconds`: how long a slot stays taken when its
    holder never releases it (keep it above the request timeout). `max_wait` (seconds): the longest
    single wait `acquire` suggests, and the longest BLPOP `take` blocks a pooled connection in.
    `clock` (seconds) is for tests; by default Redis' clock (`take` needs the real one).
    """

    def __init__(self, client: redis.Redis, *, namespace: str = "gridtune:inflight-limit",
                 adaptive: bool = True, tolerance: float = 1.3, min_queue: float = 0.1,
                 lease_seconds: float = 630.0, max_wait: float = 5.0, idle_expiry: float = IDLE_EXPIRY_SECONDS,
                 clock: Callable[[], float] | None = None, rng: random.Random | None = None):
        if not tolerance > 1:
            raise ValueError(f"tolerance must be above 1, not {tolerance!r}")
        if not (min_queue >= 0 and lease_seconds > 0 and max_wait > 0 and idle_expiry > 0):
            raise ValueError("min_queue must be >= 0; lease_seconds, max_wait and idle_expiry positive")
        self._client = client
        self._namespace = namespace
        self.adaptive = adaptive
        self._tolerance = tolerance
        self._min_queue_us = round(min_queue * 1_000_000)
        self._lease_us = round(lease_seconds * 1_000_000)
        self._max_wait = max_wait
        self._idle_ms = math.ceil(idle_expiry * 1000)
        self._clock = clock
        self._rng = rng or random.Random()
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}
        # Endpoints this process has seen metered: skipped without a Redis call unless capped.
        self._metered: set[str] = set()

    def keys(self, key: str) -> list[str]:
        """The Redis keys of `key`'s state, leases, waiters, latest latencies and wake-up tokens."""
        if not key:
            raise ValueError("an endpoint key must not be empty")
        base = f"{self._namespace}:{key}"
        return [base, f"{base}:leases", f"{base}:waiters", f"{base}:latencies", f"{base}:wakeups"]

    def acquire(self, key: str, cap: int | None = None, token: str | None = None) -> tuple[Lease | None, float]:
        """Take a slot: (lease, 0.0), or (None, seconds to wait before asking again; nothing taken).

        `token`: the caller's own, the same on every try of one wait, so that the waiters set counts
        it once (a fresh one per call by default)."""
        if (call := self._acquire_args(key, cap, token)) is None:
            return Lease(key, None), 0.0
        token, args = call
        return self._granted(key, token, int(self._scripts["acquire"](keys=self.keys(key), args=args)))

    def _acquire_args(self, key: str, cap: int | None, token: str | None) -> tuple[str, list] | None:
        """(token, ARGV) of the acquire script; None when no limit applies (nothing to ask Redis)."""
        if cap is not None and cap < 1:
            raise ValueError(f"cap must be at least 1, not {cap!r}")
        if cap is None and (not self.adaptive or key in self._metered):
            return None
        token = token or uuid.uuid4().hex
        return token, self._args(cap, token, self._lease_us)

    def _granted(self, key: str, token: str, answer: int) -> tuple[Lease | None, float]:
        """What the acquire script's answer means (see concurrency_acquire.lua)."""
        if answer < 0:
            return Lease(key, None), 0.0
        if answer == 0:
            return Lease(key, token), 0.0
        # Jitter: waiters that asked together must not all come back together.
        wait = answer / 1_000_000 * self._rng.uniform(0.5, 1.5)
        return None, min(self._max_wait, max(MIN_POLL_SECONDS, wait))

    def take(self, key: str, cap: int | None = None, *, deadline: float | None = None) -> Lease:
        """Wait for a slot and take it: returns as soon as `release` (any process, any host) frees
        one for this caller, not at its next poll. `deadline` (time.monotonic()): raise
        TimeoutError when no slot came by then. Needs the real clock (not a test's `clock`)."""
        if self._clock is not None:
            raise RuntimeError("take waits in real time: with a simulated clock, poll with acquire")
        wakeups = self.keys(key)[4]
        # One token for the whole wait: the waiters set counts this caller once, and the Lua
        # sizes wake-ups by that count. Positional, so a wrapped `acquire(*args)` still sees it.
        token = uuid.uuid4().hex
        while True:
            lease, wait = self.acquire(key, cap, token)
            if lease is not None:
                return lease
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._client.zrem(self.keys(key)[2], token)  # no longer waiting
                    raise TimeoutError(f"no in-flight slot at {key!r} before the deadline")
                wait = min(wait, left)
            # Blocks one pooled connection for at most `max_wait`; never 0 (BLPOP's "forever").
            # A token, a timeout (a lost wake-up, an expired lease) or a stale token: ask again.
            self._client.blpop([wakeups], timeout=max(MIN_POLL_SECONDS, round(wait, 3)))

    def release(self, lease: Lease, *, latency: float | None = None, outcome: Outcome = "other",
                metered: bool = False, cap: int | None = None) -> None:
        """Give the slot back; `latency` (seconds) of an "ok" answer teaches the limit, "overload"
        (a timeout) cuts it. `metered`: the answer carried rate-limit headers (see the module doc)."""
        if (args := self._release_args(lease, latency, outcome, metered, cap)) is not None:
            self._scripts["release"](keys=self.keys(lease.key), args=args)

    def _release_args(self, lease: Lease, latency: float | None, outcome: Outcome, metered: bool,
                      cap: int | None) -> list | None:
        """ARGV of the release script; None when there is nothing to tell Redis."""
        newly_metered = metered and lease.key not in self._metered
        if metered:
            self._metered.add(lease.key)
        if lease.token is None and not (newly_metered and self.adaptive):
            return None  # nothing held, nothing new to share
        if outcome not in ("ok", "overload", "other"):
            raise ValueError(f"unknown outcome {outcome!r}")
        latency_us = "" if latency is None else max(0, round(latency * 1_000_000))
        return self._args(cap, lease.token or "", outcome, latency_us, int(metered),
                          self._tolerance, self._min_queue_us)

    def queue_acquire(self, trip: RoundTrip, key: str, cap: int | None = None) -> Reply[tuple[Lease | None, float]]:
        """`acquire` sent with the other commands of `trip`: the Reply's value is acquire's answer."""
        if (call := self._acquire_args(key, cap, None)) is None:
            return Reply.ready((Lease(key, None), 0.0))
        token, args = call
        return trip.script(self._scripts["acquire"], self.keys(key), args,
                           lambda answer: self._granted(key, token, int(answer)))

    def queue_release(self, trip: RoundTrip, lease: Lease, *, latency: float | None = None,
                      outcome: Outcome = "other", metered: bool = False, cap: int | None = None) -> None:
        """`release` sent with the other commands of `trip`."""
        if (args := self._release_args(lease, latency, outcome, metered, cap)) is not None:
            trip.script(self._scripts["release"], self.keys(lease.key), args)

    def state(self, key: str) -> dict[str, float | int | None]:
        """What the shared state holds now: limit, fast_s, base_s, in_flight (for tests and status)."""
        state_key, leases, *_ = self.keys(key)
        limit, fast, base, metered = self._client.hmget(state_key, ["limit", "fast_us", "base_us", "metered"])

        def number(value, scale=1.0):
            return None if value is None else float(value) / scale

        return {"limit": number(limit), "fast_s": number(fast, 1e6), "base_s": number(base, 1e6),
                "metered": bool(metered and int(metered)), "in_flight": int(self._client.zcard(leases))}

    def _args(self, cap: int | None, *args: int | float | str) -> list:
        """ARGV of both scripts (concurrency_common.lua reads the first four), then the script's own."""
        common = ("" if self._clock is None else round(self._clock() * 1_000_000),
                  "" if cap is None else cap, int(self.adaptive), self._idle_ms)
        return [*common, *args]
