"""Per-key RPM/TPM budgets enforced like a provider's, and the `x-ratelimit-*` headers that describe them.

Three models of enforcement (`LIMIT_MODELS`, `--limit-model`):

* "window" (default): a token bucket that refills limit/60 per second and holds `burst_seconds`
  worth of it (so a client that fires a minute's budget at once is refused), and a sliding 60 s
  window that never admits more than the limit (the bucket alone would let limit + capacity
  through in a minute). `remaining` = the limit minus the last 60 s.
* "token-bucket": one bucket holding a minute of the limit, full when the key is first seen,
  refilled continuously at limit/60 per second; `remaining` = what the bucket holds now. An idle
  key can spend a minute's budget at once.
* "per-second": at most limit/60 per calendar second of the server's clock, refused with a 429
  that says nothing about when to retry (no retry-after, no "try again in"); `remaining` reports
  the minute (the limit minus the last 60 s), so it shows room the next second may not have.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

WINDOW_SECONDS = 60.0
LIMIT_MODELS = ("window", "token-bucket", "per-second")
# Float refills can land a hair below a cost that has in fact been earned.
_EPSILON = 1e-9


def go_duration(seconds: float) -> str:
    """Format like Go's time.Duration, as OpenAI's reset headers do: 20ms, 1s, 6m0s, 2m59.56s."""
    millis = round(seconds * 1000)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class MinuteLimit:
    """One limit (requests or tokens per minute) for one API key: the "window" model."""

    __slots__ = ("limit", "rate", "capacity", "level", "refilled_at", "window", "window_used")
    says_when = True

    def __init__(self, limit: int, burst_seconds: float, now: float):
        self.limit = limit
        self.rate = limit / WINDOW_SECONDS
        self.capacity = self.rate * burst_seconds
        self.level = math.inf  # full, however large the first request is
        self.refilled_at = now
        self.window: deque[tuple[float, int]] = deque()  # (accepted at, cost), oldest first
        self.window_used = 0

    def forget_expired(self, now: float) -> None:
        cutoff = now - WINDOW_SECONDS
        window = self.window
        while window and window[0][0] <= cutoff:
            self.window_used -= window.popleft()[1]

    def wait_for(self, cost: int, now: float) -> float:
        """Seconds until `cost` fits both the bucket and the window; 0 means it fits now."""
        # The bucket may grow to one request's cost, else a request above capacity never fits.
        self.level = min(max(self.capacity, cost), self.level + (now - self.refilled_at) * self.rate)
        self.refilled_at = now
        self.forget_expired(now)
        bucket_wait = 0.0 if self.level + _EPSILON >= cost else (cost - self.level) / self.rate
        return max(bucket_wait, self._window_wait(cost, now))

    def _window_wait(self, cost: int, now: float) -> float:
        excess = self.window_used + cost - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        for accepted_at, spent in self.window:
            freed += spent
            if freed >= excess:
                return accepted_at + WINDOW_SECONDS - now
        return math.inf  # cost > limit: never fits

    def spend(self, cost: int, now: float) -> None:
        self.level -= cost
        self.window.append((now, cost))
        self.window_used += cost

    def remaining(self) -> int:
        return max(0, self.limit - self.window_used)

    def reset_seconds(self) -> float:
        """Time for what the window holds to refill at limit/60 per second (OpenAI's reset-* meaning)."""
        return self.window_used / self.rate


class SlidingMinute:
    """What the last 60 s admitted: the `remaining` a per-second server reports."""

    __slots__ = ("window", "used")

    def __init__(self) -> None:
        self.window: deque[tuple[float, int]] = deque()  # (accepted at, cost), oldest first
        self.used = 0

    def forget_expired(self, now: float) -> None:
        cutoff = now - WINDOW_SECONDS
        while self.window and self.window[0][0] <= cutoff:
            self.used -= self.window.popleft()[1]

    def add(self, cost: int, now: float) -> None:
        self.window.append((now, cost))
        self.used += cost


class TokenBucketLimit:
    """A bucket holding one minute of the limit, full at first sight, refilled continuously."""

    __slots__ = ("limit", "rate", "level", "refilled_at")
    says_when = True

    def __init__(self, limit: int, now: float):
        self.limit = limit
        self.rate = limit / WINDOW_SECONDS
        self.level = float(limit)
        self.refilled_at = now

    @property
    def window_used(self) -> int:
        return max(0, math.ceil(self.limit - self.level))

    def forget_expired(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.refilled_at) * self.rate)
        self.refilled_at = now

    def wait_for(self, cost: int, now: float) -> float:
        self.forget_expired(now)
        if cost > self.limit:
            return math.inf
        return 0.0 if self.level + _EPSILON >= cost else (cost - self.level) / self.rate

    def spend(self, cost: int, now: float) -> None:
        self.level -= cost

    def remaining(self) -> int:
        return max(0, math.floor(self.level + _EPSILON))

    def reset_seconds(self) -> float:
        """Time until the bucket is full again."""
        return (self.limit - self.level) / self.rate


class PerSecondLimit:
    """At most limit/60 per calendar second; `remaining` reports the sliding minute."""

    __slots__ = ("limit", "rate", "second", "second_used", "minute")
    says_when = False

    def __init__(self, limit: int, now: float):
        self.limit = limit
        self.rate = limit / WINDOW_SECONDS
        self.second = math.floor(now)
        self.second_used = 0
        self.minute = SlidingMinute()

    @property
    def window_used(self) -> int:
        return self.minute.used

    def forget_expired(self, now: float) -> None:
        if math.floor(now) != self.second:
            self.second, self.second_used = math.floor(now), 0
        self.minute.forget_expired(now)

    def wait_for(self, cost: int, now: float) -> float:
        self.forget_expired(now)
        if cost > self.limit:
            return math.inf
        # A request above one second's share still fits an otherwise empty second.
        if self.second_used == 0 or self.second_used + cost <= self.rate + _EPSILON:
            return 0.0
        return self.second + 1 - now

    def spend(self, cost: int, now: float) -> None:
        self.second_used += cost
        self.minute.add(cost, now)

    def remaining(self) -> int:
        return max(0, self.limit - self.minute.used)

    def reset_seconds(self) -> float:
        return self.minute.used / self.rate


@dataclass(frozen=True)
class Refusal:
    kind: str  # "requests" | "tokens", OpenAI's error type
    limit: int
    used: int
    requested: int
    wait_seconds: float  # math.inf when the request alone exceeds the limit
    says_when: bool = True  # False: the 429 carries no retry-after and no "try again in"

    @property
    def too_large(self) -> bool:
        return math.isinf(self.wait_seconds)

    def message(self, model: str) -> str:
        unit = "requests per min (RPM)" if self.kind == "requests" else "tokens per min (TPM)"
        if self.too_large:
            return (
                f"Request too large for {model} in organization org-local on {unit}: Limit {self.limit}, "
                f"Requested {self.requested}. The input or output tokens must be reduced in order to run "
                "successfully."
            )
        when = f" Please try again in {go_duration(self.wait_seconds)}." if self.says_when else ""
        return (
            f"Rate limit reached for {model} in organization org-local on {unit}: Limit {self.limit}, "
            f"Used {self.used}, Requested {self.requested}.{when} "
            "Visit https://platform.openai.com/account/rate-limits to learn more."
        )


Limit = MinuteLimit | TokenBucketLimit | PerSecondLimit


class RateLimiter:
    """RPM and TPM budgets per API key under one of `LIMIT_MODELS`; `None` limits are not enforced."""

    def __init__(self, rpm: int | None, tpm: int | None, burst_seconds: float, model: str = "window"):
        if model not in LIMIT_MODELS:
            raise ValueError(f"limit model must be one of {', '.join(LIMIT_MODELS)}, not {model!r}")
        self.rpm = rpm
        self.tpm = tpm
        self.burst_seconds = burst_seconds
        self.model = model
        self._by_key: dict[str, tuple[Limit | None, Limit | None]] = {}

    def _new_limit(self, limit: int, now: float) -> Limit:
        if self.model == "token-bucket":
            return TokenBucketLimit(limit, now)
        if self.model == "per-second":
            return PerSecondLimit(limit, now)
        return MinuteLimit(limit, self.burst_seconds, now)

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _limits(self, key: str, now: float) -> tuple[Limit | None, Limit | None]:
        limits = self._by_key.get(key)
        if limits is None:
            limits = (
                self._new_limit(self.rpm, now) if self.rpm else None,
                self._new_limit(self.tpm, now) if self.tpm else None,
            )
            self._by_key[key] = limits
        return limits

    def try_spend(self, key: str, tokens: int, now: float) -> Refusal | None:
        """Spend one request and `tokens` from `key`'s budget, or leave it untouched and say why not."""
        requests_limit, tokens_limit = self._limits(key, now)
        refusal = None
        for kind, limit, cost in (("requests", requests_limit, 1), ("tokens", tokens_limit, tokens)):
            if limit is None:
                continue
            wait = limit.wait_for(cost, now)
            if wait > 0 and (refusal is None or wait > refusal.wait_seconds):
                refusal = Refusal(kind, limit.limit, limit.window_used, cost, wait, limit.says_when)
        if refusal is None:
            for limit, cost in ((requests_limit, 1), (tokens_limit, tokens)):
                if limit is not None:
                    limit.spend(cost, now)
        return refusal

    def headers(self, key: str, now: float) -> dict[str, str]:
        """The `x-ratelimit-*` headers for `key`, only for the limits that are configured."""
        headers = {}
        for kind, limit in zip(("requests", "tokens"), self._limits(key, now)):
            if limit is None:
                continue
            limit.forget_expired(now)
            headers[f"x-ratelimit-limit-{kind}"] = str(limit.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(limit.remaining())
            headers[f"x-ratelimit-reset-{kind}"] = go_duration(limit.reset_seconds())
        return headers
