"""Two patches of kombu's Redis transport (kombu 5.7): a guard on broker loss, and a reused client.

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

from contextlib import contextmanager

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


_CACHED_CLIENT = "_gridtune_sync_client"


def reuse_sync_client() -> None:
    """Patch kombu's Redis Channel once (idempotent): one synchronous client per channel and pool.

    kombu builds a new `redis.Redis` for every `conn_or_acquire()` (each ack, each unacked-message
    bookkeeping step: two per task), and redis-py 8's constructor copies its table of ~200 response
    callbacks: about 5 % of a ceiling worker's CPU. A client is thread-safe (it takes a connection
    from the pool per command), so the channel keeps one, replaced whenever the channel's pool is
    (after a fork or a reconnect, kombu sets a new one).
    """
    channel = kombu_redis.Channel
    if getattr(channel.conn_or_acquire, _GUARD, False):
        return

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get(_CACHED_CLIENT)
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__[_CACHED_CLIENT] = cached
        yield cached[1]

    setattr(conn_or_acquire, _GUARD, True)
    channel.conn_or_acquire = conn_or_acquire
