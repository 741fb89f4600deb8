"""Several Redis commands of one request in one round trip.

A row used to cost seven round trips to the shared Redis (in-flight entry, rate budget, in-flight
slot, its release, the token settle, the failure streak, the entry's removal). Each is a socket
write and a blocking read, and on a worker with dozens of threads every blocking read gives the
GIL away and waits to get it back: at the ceiling that was a fifth of the worker's CPU. The
commands whose answers are not needed to go on are queued and sent together:

    trip = RoundTrip(client)
    granted = limiter.queue_reserve(trip, key, tokens)   # a Reply; scripts go as EVALSHA
    trip.call("zadd", "some:key", {"member": 1.0})
    trip.execute()                                       # one write, one read
    wait = granted.value

redis-py's own pipelines ask `SCRIPT EXISTS` before every execute that holds a `Script` (one more
round trip each time); here scripts go as bare EVALSHA and only a script the server no longer
has (NOSCRIPT: Redis restarted or its script cache was flushed) is sent again, alone, through the
`Script` object, which loads it. Commands are not atomic together (no MULTI): each script is.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

T = TypeVar("T")
_UNSET = object()


class Reply(Generic[T]):
    """One queued command's answer, readable once the round trip has run (`value`)."""

    __slots__ = ("_value", "_convert")

    def __init__(self, convert: Callable[[Any], T] | None = None):
        self._convert = convert
        self._value: Any = _UNSET

    @classmethod
    def ready(cls, value: T) -> Reply[T]:
        """An answer known without asking Redis (no limit applies, nothing to send)."""
        reply = cls()
        reply._value = value
        return reply

    def _set(self, raw: Any) -> None:
        self._value = raw if self._convert is None else self._convert(raw)

    @property
    def value(self) -> T:
        if self._value is _UNSET:
            raise RuntimeError("the round trip holding this command has not run yet")
        return self._value


class RoundTrip:
    """Commands queued on one non-transactional pipeline; `execute` sends them all at once."""

    def __init__(self, client: redis.Redis):
        self._pipe = client.pipeline(transaction=False)
        self._replies: list[Reply] = []
        self._scripts: dict[int, tuple[Script, list, list]] = {}

    def __len__(self) -> int:
        return len(self._replies)

    def script(self, script: Script, keys: list, args: list, convert: Callable[[Any], T] | None = None) -> Reply[T]:
        """Queue `script` as EVALSHA; `convert` turns its raw answer into the Reply's value."""
        self._scripts[len(self._replies)] = (script, keys, args)
        self._pipe.evalsha(script.sha, len(keys), *keys, *args)
        return self._add(convert)

    def call(self, command: str, *args: Any, **kwargs: Any) -> Reply:
        """Queue a plain command by its redis-py method name (`"zadd"`, `"delete"`, ...)."""
        getattr(self._pipe, command)(*args, **kwargs)
        return self._add(None)

    def _add(self, convert) -> Reply:
        reply = Reply(convert)
        self._replies.append(reply)
        return reply

    def execute(self) -> None:
        """Send everything queued (nothing when empty). Connection errors raise as redis-py's do;
        an error answer to any command raises after the others' answers are read."""
        if not self._replies:
            return
        try:
            raw = self._pipe.execute(raise_on_error=False)
        finally:
            self._pipe.reset()
        first_error = None
        for index, (reply, answer) in enumerate(zip(self._replies, raw)):
            if isinstance(answer, NoScriptError) and index in self._scripts:
                script, keys, args = self._scripts[index]
                answer = script(keys=keys, args=args)  # loads the script, then runs it
            if isinstance(answer, Exception):
                first_error = first_error or answer
                continue
            reply._set(answer)
        self._replies, self._scripts = [], {}
        if first_error is not None:
            raise first_error
