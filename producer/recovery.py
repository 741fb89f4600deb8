"""The stall watchdog behind `sweep --wait` and `status --watch`.

A SIGKILLed worker can take a message with it: the Redis transport pops a message and records it
as unacked in a second step, and a kill in between loses it. Its chord can then never complete.
The database knows which requests have no row, so when rows are missing while the broker holds
nothing for this app (no queued and no unacked message) and no request is in flight, for longer
than `stall_seconds`, the watchdog resumes the sweep: exactly the missing requests are sent again
as a new chord. Only for Redis brokers (the only transport gridtune runs distributed on).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

import redis

log = logging.getLogger(__name__)

# kombu's Redis transport keeps one list per priority step besides the plain queue name.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def broker_idle(client: redis.Redis, queues: tuple[str, ...]) -> bool:
    """True when no message of these queues is queued or unacked (held by a worker)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
    pipe.hlen("unacked")
    return not any(pipe.execute())


class StallWatch:
    """Calls `resume()` once the sweep has looked stalled for `stall_seconds` in a row."""

    def __init__(self, is_idle: Callable[[], bool], resume: Callable[[], int], stall_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.is_idle, self.resume, self.stall_seconds, self.clock = is_idle, resume, stall_seconds, clock
        self.idle_since: float | None = None
        self.resumed = 0

    def __call__(self, snap: dict[str, Any]) -> None:
        stalled = snap["state"] == "running" and snap["remaining"] > 0 and not snap["in_flight"]
        try:
            stalled = stalled and self.is_idle()
        except redis.RedisError:
            stalled = False  # the broker itself is away: workers will reconnect, nothing to resend yet
        if not stalled:
            self.idle_since = None
            return
        now = self.clock()
        if self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self.stall_seconds:
            sent = self.resume()
            self.resumed += sent
            self.idle_since = None
            print(f"sweep {snap['name']} stalled: {snap['remaining']} requests had no row and nothing was queued "
                  f"or running; sent {sent} again", file=sys.stderr, flush=True)
