"""The overload mode: a server that queues instead of refusing, its latency growing with concurrency.

Processor sharing, the model of a server that batches everything it has been sent (vLLM,
`transformers serve`, a small local model): up to `capacity` requests run at full speed, each
taking its `work` seconds; beyond that they share the server, so each one runs at
capacity / in_flight of full speed and latency grows in proportion to the excess. Throughput is
flat past `capacity`: sending more only makes every request slower, until clients time out.

Like those servers it goes on working on a request whose client has gone (a timeout): the work
is done for nobody and slows everyone else down.

Exact, without polling: the server keeps a virtual clock that advances at the shared speed, and
one timer for the request that will finish first.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class ProcessorSharing:
    """`await serve(work)` returns after `work` seconds of service shared with everyone else in flight.

    Runs on the event loop that calls it. `max_in_flight` is the most ever in service at once.
    """

    def __init__(self, capacity: int, clock=time.monotonic):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._clock = clock
        self._virtual = 0.0  # service a request running since time 0 would have received, in seconds
        self._updated = clock()
        self._jobs: list[tuple[float, int, asyncio.Future]] = []  # (virtual finish, order, done)
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.max_in_flight = 0

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def speed(self) -> float:
        """The share of full speed each request in service gets now."""
        return min(1.0, self.capacity / len(self._jobs)) if self._jobs else 1.0

    async def serve(self, work: float) -> None:
        loop = asyncio.get_running_loop()
        self._advance()
        done = loop.create_future()
        heapq.heappush(self._jobs, (self._virtual + max(0.0, work), next(self._order), done))
        self.max_in_flight = max(self.max_in_flight, len(self._jobs))
        self._schedule(loop)
        # Shielded: a client that gives up cancels its wait, not the server's work.
        await asyncio.shield(done)

    def _advance(self) -> None:
        now = self._clock()
        self._virtual += (now - self._updated) * self.speed()
        self._updated = now

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._jobs:
            delay = max(0.0, (self._jobs[0][0] - self._virtual) / self.speed())
            self._timer = loop.call_later(delay, self._finish, loop)

    def _finish(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._advance()
        while self._jobs and self._jobs[0][0] <= self._virtual + 1e-9:
            _, _, done = heapq.heappop(self._jobs)
            if not done.done():
                done.set_result(None)
        self._schedule(loop)
