"""A guard for kombu's Redis transport on broker loss (kombu 5.7).

When the broker connection drops, Celery's consumer first `collect()`s the connection and then
closes it again. If the first close failed part-way (the socket was already gone), the second one
closes the default channel of a transport whose `client` is already None; the channel tries to
put its unacked messages back through a new pool, `_connparams` reads `None.hostname`, and the
AttributeError (not a connection error, so nothing catches it) ends the worker process:
`Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")`.

The guard makes that case what it is, a connection error: `maybe_close_channel` / `ignore_errors`
swallow it, the consumer reconnects, and the messages stay in Redis' `unacked` hash, where the
visibility timeout restores them (or, if the broker came back empty, resuming the sweep resends
the requests). Nothing else changes: with a live transport the original `_connparams` runs.
"""

from __future__ import annotations

import redis
from kombu.transport import redis as kombu_redis

_GUARD = "_gridtune_closed_transport_guard"


def guard_closed_transport() -> None:
    """Patch kombu's Redis Channel once (idempotent)."""
    channel = kombu_redis.Channel
    if getattr(channel._connparams, _GUARD, False):
        return
    original = channel._connparams

    def _connparams(self, asynchronous=False):
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.ConnectionError("the broker connection is already closed")
        return original(self, asynchronous=asynchronous)

    setattr(_connparams, _GUARD, True)
    channel._connparams = _connparams
