"""Per-process resources a worker shares across its threads: engine, API client, rate limiter.

Created lazily on first use and dropped after a fork (prefork children must not share sockets).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import cached_property

import redis

from gridtune.settings import Settings, get_settings
from gridtune.sweep import SweepConfig
from models import get_engine
from worker.ratelimit import Limits, RateLimiter
from worker.ratelimit.concurrency import InFlightLimiter
from worker.ratelimit.roundtrip import RoundTrip
from worker.ratelimit.spend import RedisSpendLimiter

log = logging.getLogger(__name__)


class WorkerContext:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._budget_keys: dict[str, str] = {}  # model -> its rate budget, configured
        self._lock = threading.Lock()

    @cached_property
    def engine(self):
        return get_engine(self.settings.database_url)

    @cached_property
    def client(self):
        from worker.llm import make_client

        return make_client(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        """The Redis that holds shared state (rate budget, cool-downs, progress counters)."""
        url = self.settings.shared_redis_url
        if url:
            # redis-py raises instead of waiting when its pool is exhausted: size it above the
            # thread pool and make it block.
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=self.settings.worker_concurrency + 20, timeout=30
            )
            return redis.Redis(connection_pool=pool)
        from worker.embedded import in_process_redis

        if not self.settings.embedded:
            log.warning("no Redis configured (GRIDTUNE_REDIS_URL): the rate budget is per process")
        return in_process_redis()

    @cached_property
    def limiter(self) -> RateLimiter:
        # Unknown limits = no limit until the first x-ratelimit-* headers teach them (servers
        # that send none, like many self-hosted ones, are then never throttled by us).
        return RateLimiter(self.redis, burst_seconds=self.settings.burst_seconds, fallback=Limits(),
                           headroom=self.settings.headroom)

    @cached_property
    def in_flight_limiter(self) -> InFlightLimiter:
        """Requests in flight per endpoint, for servers that queue instead of refusing."""
        settings = self.settings
        # A slot outlives the longest request, so only a dead worker's slot is ever reclaimed.
        return InFlightLimiter(self.redis, adaptive=settings.adaptive_in_flight,
                               tolerance=settings.latency_tolerance, lease_seconds=settings.request_timeout + 30,
                               max_wait=settings.max_inline_wait or 1.0)

    @cached_property
    def spend(self) -> RedisSpendLimiter:
        """Every sweep's spend budget (money, for the spend cap), on the same Redis."""
        return RedisSpendLimiter(self.redis)

    def rate_budget(self, model: str, config: SweepConfig) -> str:
        """The shared rate budget of `model` under this worker's key and endpoint
        (`llm.budget_key`); tells the shared limiter the configured limits, once per process and
        budget. Read for every request: the key is hashed only the first time."""
        key = self._budget_keys.get(model)
        if key is not None:
            return key
        from worker.llm import budget_key  # lazily, like make_client: the SDK loads with the worker

        with self._lock:
            key = budget_key(model, self.settings)
            limits = Limits(
                rpm=self.settings.rpm or config.model.rpm, tpm=self.settings.tpm or config.model.tpm
            )
            if limits.rpm or limits.tpm:
                self.limiter.configure(key, limits)
            self._budget_keys[model] = key
        return key


IN_FLIGHT_KEY = "gridtune:inflight:{sweep_id}"
# A task that died without saying so stops counting as in flight after this long.
IN_FLIGHT_HORIZON = 600


class InFlightEntry:
    """A running request in its sweep's in-flight set, for progress displays and the stall watchdog
    (a sorted set by start time, so a crashed worker's entries age out).

    Added and removed with the request's other Redis commands (`queue_add` / `queue_remove` on
    its RoundTrip) rather than in round trips of their own; `close` removes an entry that is
    still there when the task ends (an early return or an exception).
    """

    def __init__(self, sweep_id: int, task_id: str):
        self.key = IN_FLIGHT_KEY.format(sweep_id=sweep_id)
        self.task_id = task_id
        self.listed = False

    def queue_add(self, trip: RoundTrip) -> None:
        if not self.listed:
            trip.call("zadd", self.key, {self.task_id: time.time()})
            trip.call("expire", self.key, IN_FLIGHT_HORIZON)
            self.listed = True

    def queue_remove(self, trip: RoundTrip) -> None:
        if self.listed:
            trip.call("zrem", self.key, self.task_id)
            self.listed = False

    def close(self, client: redis.Redis) -> None:
        if not self.listed:
            return
        try:
            client.zrem(self.key, self.task_id)
            self.listed = False
        except redis.RedisError:
            log.debug("cannot clear in-flight request", exc_info=True)


def count_in_flight(client: redis.Redis, sweep_id: int) -> int:
    return client.zcount(IN_FLIGHT_KEY.format(sweep_id=sweep_id), time.time() - IN_FLIGHT_HORIZON, "+inf")


_context: WorkerContext | None = None
_context_pid: int | None = None


def get_context() -> WorkerContext:
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context, _context_pid = WorkerContext(get_settings()), os.getpid()
    return _context


def reset_context() -> None:
    global _context
    _context = None
