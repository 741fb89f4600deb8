"""The shared rate budget: a Redis-backed GCRA limiter (headroom-aware) and a no-op stand-in."""

from __future__ import annotations

import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from worker.ratelimit.roundtrip import Reply, RoundTrip

log = logging.getLogger(__name__)

IDLE_EXPIRY_SECONDS = 24 * 3600
# int() would also take "1_000", "+5" and non-ASCII digits; 15 digits stay exact in Lua numbers.
_COUNT = re.compile(r"[0-9]{1,15}")


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute; None = not known (or, in force, unlimited)."""

    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, not {value!r}")


class Limiter(ABC):
    """One budget per caller-chosen `key` (e.g. model name + a short hash of the API key)."""

    @abstractmethod
    def configure(self, key: str, limits: Limits) -> None:
        """Limits from config/env; they override learnt ones. None fields are not configured."""

    @abstractmethod
    def reserve(self, key: str, tokens: int) -> float:
        """Take 1 request + `tokens` atomically: 0.0 = granted, else seconds to wait (nothing taken)."""

    @abstractmethod
    def settle(self, key: str, reserved_tokens: int, actual_tokens: int) -> None:
        """Refund or charge the difference once the real token usage is known."""

    def queue_reserve(self, trip: RoundTrip, key: str, tokens: int) -> Reply[float]:
        """`reserve` sent with the other commands of `trip` (here: at once, for backends that
        have no round trips to share)."""
        return Reply.ready(self.reserve(key, tokens))

    def queue_settle(self, trip: RoundTrip, key: str, reserved_tokens: int, actual_tokens: int) -> None:
        """`settle` sent with the other commands of `trip` (here: at once)."""
        self.settle(key, reserved_tokens, actual_tokens)

    @abstractmethod
    def observe(self, key: str, headers: Mapping[str, str]) -> None:
        """Learn from x-ratelimit-* response headers; malformed ones are ignored."""

    def queue_observe(self, trip: RoundTrip, key: str, headers: Mapping[str, str]) -> None:
        """`observe` sent with the other commands of `trip` (here: at once)."""
        self.observe(key, headers)

    @abstractmethod
    def cool_down(self, key: str, seconds: float) -> None:
        """Pause every worker's reserve() for `seconds` (after a 429); never shortens a pause."""

    @abstractmethod
    def limits(self, key: str) -> Limits:
        """The limits in force: configured > learnt > fallback."""


class NullLimiter(Limiter):
    """No limit at all: for code paths (local servers, tests) that must not be throttled."""

    def configure(self, key: str, limits: Limits) -> None:
        pass

    def reserve(self, key: str, tokens: int) -> float:
        return 0.0

    def settle(self, key: str, reserved_tokens: int, actual_tokens: int) -> None:
        pass

    def observe(self, key: str, headers: Mapping[str, str]) -> None:
        pass

    def cool_down(self, key: str, seconds: float) -> None:
        pass

    def limits(self, key: str) -> Limits:
        return Limits()


def lua_script(*names: str) -> str:
    """clock.lua followed by the named Lua files of this folder (without `.lua`), as one script.

    Read next to this file, however the package was imported (a namespace package has no single root).
    """
    here = Path(__file__).resolve().parent
    return "\n".join((here / f"{name}.lua").read_text(encoding="utf-8") for name in ("clock", *names))


_SCRIPTS = {name: lua_script("common", name) for name in ("reserve", "settle", "observe", "cool_down")}


class RateLimiter(Limiter):
    """A budget shared by every process that uses the same Redis and namespace.

    GCRA in Lua: each budget keeps a request schedule and a token schedule, checked and advanced
    together in one script. `burst_seconds` of the rate may be taken at once, more with `headroom`
    where the provider's `x-ratelimit-remaining-*` shows room (token buckets holding a minute); a
    429 while it showed room marks the budget quantized and headroom stays off for it (`quantized`).
    `clock` (seconds) is for tests only: by default every host uses the Redis server's clock.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "gridtune:rl",
        burst_seconds: float = 1.0,
        fallback: Limits = Limits(rpm=60, tpm=60_000),
        idle_expiry: float = IDLE_EXPIRY_SECONDS,
        clock: Callable[[], float] | None = None,
        headroom: bool = True,
    ):
        if not burst_seconds > 0 or not idle_expiry > 0:
            raise ValueError("burst_seconds and idle_expiry must be positive")
        self._client = client
        self._namespace = namespace
        self._burst_us = round(burst_seconds * 1_000_000)
        self._fallback = fallback
        self._idle_expiry_ms = math.ceil(idle_expiry * 1000)
        self._clock = clock
        self._headroom = headroom
        # Configured limits come from each process's own config/env, so they live in the process.
        self._configured: dict[str, Limits] = {}
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}

    def redis_key(self, key: str) -> str:
        """The Redis key holding `key`'s budget."""
        if not key:
            raise ValueError("a budget key must not be empty")
        return f"{self._namespace}:{key}"

    def configure(self, key: str, limits: Limits) -> None:
        self._configured[key] = limits

    def reserve(self, key: str, tokens: int) -> float:
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, not {tokens}")
        return self._run("reserve", key, tokens) / 1_000_000

    def queue_reserve(self, trip: RoundTrip, key: str, tokens: int) -> Reply[float]:
        """`reserve` as part of a round trip: the Reply's value is the seconds to wait (0.0 = granted)."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, not {tokens}")
        return trip.script(self._scripts["reserve"], [self.redis_key(key)], self._args(key, tokens),
                           lambda answer: int(answer) / 1_000_000)

    def settle(self, key: str, reserved_tokens: int, actual_tokens: int) -> None:
        if actual_tokens != reserved_tokens:
            self._run("settle", key, actual_tokens - reserved_tokens)

    def queue_settle(self, trip: RoundTrip, key: str, reserved_tokens: int, actual_tokens: int) -> None:
        """`settle` as part of a round trip."""
        if actual_tokens != reserved_tokens:
            trip.script(self._scripts["settle"], [self.redis_key(key)],
                        self._args(key, actual_tokens - reserved_tokens))

    def observe(self, key: str, headers: Mapping[str, str]) -> None:
        if (args := _observed(headers)) is not None:
            self._run("observe", key, *args)

    def queue_observe(self, trip: RoundTrip, key: str, headers: Mapping[str, str]) -> None:
        if (args := _observed(headers)) is not None:
            trip.script(self._scripts["observe"], [self.redis_key(key)], self._args(key, *args))

    def cool_down(self, key: str, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a cool-down must be a finite number of seconds >= 0, not {seconds!r}")
        self._run("cool_down", key, math.ceil(seconds * 1_000_000))

    def limits(self, key: str) -> Limits:
        learnt_rpm, learnt_tpm = self._client.hmget(self.redis_key(key), ["learnt_rpm", "learnt_tpm"])
        configured = self._configured.get(key, Limits())

        def in_force(configured_value: int | None, learnt: bytes | str | None, fallback: int | None):
            if configured_value is not None:
                return configured_value
            return int(learnt) if learnt is not None else fallback

        return Limits(
            rpm=in_force(configured.rpm, learnt_rpm, self._fallback.rpm),
            tpm=in_force(configured.tpm, learnt_tpm, self._fallback.tpm),
        )

    def quantized(self, key: str) -> bool:
        """True once a 429 came while the provider reported room: `key` is paced at the nominal
        rate and burst from then on (until the budget expires)."""
        return self._client.hget(self.redis_key(key), "quantized") in (b"1", "1")

    def burst(self, key: str) -> float:
        """Seconds of the request rate `key` may spend at once now: `burst_seconds`, or the
        headroom learnt from the provider's `remaining` (up to 60)."""
        head = self._client.hget(self.redis_key(key), "req_head")
        nominal = self._burst_us / 1_000_000
        if not self._headroom or head is None or self.quantized(key):
            return nominal
        return max(nominal, int(head) / 1_000_000)

    def learnt(self, key_prefix: str) -> Limits:
        """The highest limits learnt by any budget whose key starts with `key_prefix` (e.g. a model
        name and ":"), for callers that do not hold the API key that names the budget."""
        rpm = tpm = None
        for redis_key in self._client.scan_iter(match=f"{self._namespace}:{_glob_escape(key_prefix)}*", count=200):
            learnt_rpm, learnt_tpm = self._client.hmget(redis_key, ["learnt_rpm", "learnt_tpm"])
            if learnt_rpm is not None:
                rpm = max(rpm or 0, int(learnt_rpm))
            if learnt_tpm is not None:
                tpm = max(tpm or 0, int(learnt_tpm))
        return Limits(rpm=rpm, tpm=tpm)

    def _run(self, script: str, key: str, *args: int | str) -> int:
        return int(self._scripts[script](keys=[self.redis_key(key)], args=self._args(key, *args)))

    def _args(self, key: str, *args: int | str) -> list[int | str]:
        """ARGV of every script (common.lua reads the first eight), then the script's own."""
        configured = self._configured.get(key, Limits())
        common = (
            "" if self._clock is None else round(self._clock() * 1_000_000),
            self._idle_expiry_ms,
            _optional(configured.rpm),
            _optional(configured.tpm),
            _optional(self._fallback.rpm),
            _optional(self._fallback.tpm),
            self._burst_us,
            "1" if self._headroom else "0",
        )
        return [*common, *args]


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _optional(value: int | None) -> int | str:
    return "" if value is None else value


def _observed(headers: Mapping[str, str]) -> tuple[int | str, ...] | None:
    """observe.lua's arguments from a response's headers; None when no x-ratelimit header is
    readable (local servers, most self-hosted ones): nothing to learn, so nothing to send (the
    script would only refresh the key's expiry, as reserve does)."""
    named = {name.lower(): value for name, value in headers.items()}
    args = (*_header_args(named, "requests"), *_header_args(named, "tokens"))
    return args if any(arg != "" for arg in args) else None


def _header_args(headers: Mapping[str, str], dimension: str) -> tuple[int | str, int | str]:
    """(limit, remaining) from one dimension's headers; "" where absent or unreadable."""
    return (
        _count_header(headers, f"x-ratelimit-limit-{dimension}", minimum=1),
        _count_header(headers, f"x-ratelimit-remaining-{dimension}", minimum=0),
    )


def _count_header(headers: Mapping[str, str], name: str, *, minimum: int) -> int | str:
    if name not in headers:
        return ""
    text = str(headers[name]).strip()
    if not _COUNT.fullmatch(text) or int(text) < minimum:
        log.debug("ignoring malformed %s header %r", name, headers[name])
        return ""
    return int(text)
