"""The spend budget: money a sweep may spend, shared by every worker, never exceeded.

    spend = RedisSpendLimiter(redis.Redis.from_url(url))
    spend.open(key, spent_usd=already_spent_in_db)        # producer, when a sweep (re)starts
    if not spend.reserve(key, worst_case_usd, cap_usd):   # worker, before each call
        stop the sweep: the cap is reached
    response = call()
    spend.settle(key, worst_case_usd, actual_usd)          # worker, after the call

A reservation is granted only if spent + reserved + amount <= cap, atomically (Lua in
`spend_*.lua` beside this module), so any number of workers together can never pass the cap as
long as each reserves the most its call can cost (input tokens + max output tokens at the price).
Money is kept as integer nano-USD: reservations round up, actual costs to the nearest nano-USD.

`key` names one sweep's budget (`sweep_budget_key`: its id and creation time). Backends: `RedisSpendLimiter` (the cluster),
`MemorySpendLimiter` (one process: tests, tools); both implement the abstract `SpendLimiter`.
"""

from __future__ import annotations

import functools
import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.resources import files

import redis

NANO = 1_000_000_000  # nano-USD per USD
IDLE_EXPIRY_SECONDS = 7 * 24 * 3600  # a resumed sweep re-reads its spend from the database anyway


@functools.lru_cache(maxsize=1024)  # read for every request of a sweep: the same few values
def sweep_budget_key(sweep_id: int, created_at: datetime) -> str:
    """A sweep's budget: its id and creation time (ids repeat across databases sharing one Redis)."""
    moment = created_at if created_at.tzinfo else created_at.replace(tzinfo=timezone.utc)
    return f"sweep:{sweep_id}:{round(moment.timestamp() * 1_000_000)}"


def _nano_up(usd: float) -> int:
    if not (math.isfinite(usd) and usd >= 0):
        raise ValueError(f"an amount must be a finite number of USD >= 0, not {usd!r}")
    return math.ceil(round(usd * NANO, 3))  # round first: 0.1 * 1e9 is 100000000.00000001


def _nano(usd: float) -> int:
    if not (math.isfinite(usd) and usd >= 0):
        raise ValueError(f"an amount must be a finite number of USD >= 0, not {usd!r}")
    return round(usd * NANO)


@dataclass(frozen=True)
class Spend:
    """A budget's state in USD: settled spend, and what calls in flight have reserved."""

    spent_usd: float
    reserved_usd: float


class SpendLimiter(ABC):
    """Money per caller-chosen `key`; amounts and caps in USD."""

    @abstractmethod
    def open(self, key: str, spent_usd: float) -> Spend:
        """Make sure `spent` is at least `spent_usd` (what the database knows); never lowers it."""

    @abstractmethod
    def reserve(self, key: str, amount_usd: float, cap_usd: float) -> bool:
        """Reserve `amount_usd` if spent + reserved + amount <= cap; False = nothing reserved."""

    @abstractmethod
    def settle(self, key: str, reserved_usd: float, actual_usd: float) -> None:
        """Release a reservation and record what the call actually cost (0 if it cost nothing)."""

    @abstractmethod
    def state(self, key: str) -> Spend:
        """Spent and reserved now."""


class MemorySpendLimiter(SpendLimiter):
    """One process's budgets behind a lock: the same rules without Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[str, list[int]] = {}  # key -> [spent, reserved] in nano-USD

    def _budget(self, key: str) -> list[int]:
        return self._budgets.setdefault(key, [0, 0])

    def open(self, key: str, spent_usd: float) -> Spend:
        with self._lock:
            budget = self._budget(key)
            budget[0] = max(budget[0], _nano(spent_usd))
        return self.state(key)

    def reserve(self, key: str, amount_usd: float, cap_usd: float) -> bool:
        amount, cap = _nano_up(amount_usd), _nano(cap_usd)
        with self._lock:
            budget = self._budget(key)
            if budget[0] + budget[1] + amount > cap:
                return False
            budget[1] += amount
            return True

    def settle(self, key: str, reserved_usd: float, actual_usd: float) -> None:
        with self._lock:
            budget = self._budget(key)
            budget[1] = max(0, budget[1] - _nano_up(reserved_usd))
            budget[0] += _nano(actual_usd)

    def state(self, key: str) -> Spend:
        with self._lock:
            spent, reserved = self._budget(key)
        return Spend(spent / NANO, reserved / NANO)


def _script(name: str) -> str:
    return files(__package__).joinpath(f"{name}.lua").read_text()


_SCRIPTS = {name: _script(f"spend_{name}") for name in ("open", "reserve", "settle")}


class RedisSpendLimiter(SpendLimiter):
    """Budgets shared by every process on the same Redis and namespace (hashes `<namespace>:<key>`
    that expire after `idle_expiry` seconds without use)."""

    def __init__(self, client: redis.Redis, *, namespace: str = "gridtune:spend",
                 idle_expiry: float = IDLE_EXPIRY_SECONDS):
        if not idle_expiry > 0:
            raise ValueError("idle_expiry must be positive")
        self._client = client
        self._namespace = namespace
        self._expiry_ms = math.ceil(idle_expiry * 1000)
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}

    def redis_key(self, key: str) -> str:
        if not key:
            raise ValueError("a budget key must not be empty")
        return f"{self._namespace}:{key}"

    def open(self, key: str, spent_usd: float) -> Spend:
        spent, reserved = self._scripts["open"](keys=[self.redis_key(key)], args=[_nano(spent_usd), self._expiry_ms])
        return Spend(int(spent) / NANO, int(reserved) / NANO)

    def reserve(self, key: str, amount_usd: float, cap_usd: float) -> bool:
        granted, _spent, _reserved = self._scripts["reserve"](
            keys=[self.redis_key(key)], args=[_nano_up(amount_usd), _nano(cap_usd), self._expiry_ms])
        return int(granted) == 1

    def settle(self, key: str, reserved_usd: float, actual_usd: float) -> None:
        self._scripts["settle"](keys=[self.redis_key(key)],
                                args=[_nano_up(reserved_usd), _nano(actual_usd), self._expiry_ms])

    def state(self, key: str) -> Spend:
        spent, reserved = self._client.hmget(self.redis_key(key), ["spent", "reserved"])
        return Spend(int(spent or 0) / NANO, int(reserved or 0) / NANO)
