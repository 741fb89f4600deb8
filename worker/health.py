"""Is the endpoint dead? A streak of identical failures, shared by every worker through Redis.

A wrong OPENAI_BASE_URL (connection refused, DNS, TLS), a route that answers 404, a server that
fails everything the same way: every request would retry `GRIDTUNE_MAX_ATTEMPTS` times before
failing. Instead, once `GRIDTUNE_DEAD_ENDPOINT_FAILURES` attempts in a row (any request, any
worker, no success in between) failed with the same kind and message over at least
`GRIDTUNE_DEAD_ENDPOINT_SECONDS`, the sweep is stopped with that one reason, as an auth failure
stops it. Rate limiting never counts (it has its own waits).

The streak is per sweep *run*: its key includes the sweep's `enqueued_at`, so resuming the sweep
(`sweep` again, once the endpoint is fixed) starts from zero.
"""

from __future__ import annotations

import functools
import logging

import redis

from models.schema import Sweep
from worker.llm import Failure
from worker.ratelimit.roundtrip import RoundTrip

log = logging.getLogger(__name__)

STREAK_KEY = "gridtune:streak:{sweep_id}:{run}"
STREAK_EXPIRY_SECONDS = 3600

# KEYS[1] = streak hash; ARGV = signature, expiry. Returns {streak length including this one,
# milliseconds since the streak's first failure} on Redis's clock (one clock for every worker).
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 1
local since = now
if redis.call('HGET', KEYS[1], 'sig') == ARGV[1] then
  n = redis.call('HINCRBY', KEYS[1], 'n', 1)
  since = tonumber(redis.call('HGET', KEYS[1], 'since')) or now
else
  redis.call('HSET', KEYS[1], 'sig', ARGV[1], 'n', 1, 'since', now)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return {n, now - since}
"""


def _key(sweep: Sweep) -> str:
    return _streak_key(sweep.id, sweep.created_at, sweep.enqueued_at)


@functools.lru_cache(maxsize=1024)  # every success clears it: the same few sweeps
def _streak_key(sweep_id: int, created_at, enqueued_at) -> str:
    # created_at tells apart sweeps of different databases that share an id and a Redis.
    run = f"{created_at.isoformat() if created_at else ''}|{enqueued_at.isoformat() if enqueued_at else ''}"
    return STREAK_KEY.format(sweep_id=sweep_id, run=run)


def failed(ctx, sweep: Sweep, failure: Failure) -> str | None:
    """Record one failed attempt; returns the reason to stop the sweep when the streak is long enough.

    Never raises: without Redis there is no streak (each request still retries on its own).
    """
    if failure.kind == "rate_limited":
        return None
    settings = ctx.settings
    try:
        count, age_ms = ctx.redis.eval(_RECORD, 1, _key(sweep), f"{failure.kind}\x00{failure.message}",
                                       STREAK_EXPIRY_SECONDS)
    except redis.RedisError:
        log.debug("cannot record the failure streak", exc_info=True)
        return None
    # Both a count and a span: a blip that fails every request in flight at once (a server
    # restarting) is not a dead endpoint.
    if int(count) < settings.dead_endpoint_failures or int(age_ms) / 1000 < settings.dead_endpoint_seconds:
        return None
    where = ctx.settings.openai_base_url or "the OpenAI API"
    return (f"{int(count)} requests in a row failed the same way at {where}: {failure.message}; "
            f"fix it, then run the same `python -m producer sweep` command again to resume")


def queue_succeeded(trip: RoundTrip, sweep: Sweep) -> None:
    """A success ends any streak (sent with the request's other bookkeeping)."""
    trip.call("delete", _key(sweep))
