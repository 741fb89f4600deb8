"""What one Redis command costs a worker's CPU alone and among many threads ("the GIL tax").

A ceiling worker runs 16 threads on one GIL. Every system call that CPython makes with the GIL
released (send, recv, poll, and `settimeout`'s ioctl) lets a waiting thread be woken to take it;
when the call returns at once the woken thread finds the GIL taken again and goes back to sleep:
a futex wake, two context switches and a futex wait for nothing. So a call costs more CPU among
16 threads than alone, and costs more the more such system calls it makes. Four ways to send the
same one-key EVALSHA to the benchmark Redis, each alone and from T threads:

* `redis-py`: a client on redis-py's BlockingConnectionPool, as the worker's rate budget uses;
  the pool probes each connection it hands out for unread data (`ensure_connection` ->
  `can_read`: settimeout(0), a non-blocking recv, settimeout back) before the command;
* `redis-py, no probe`: the same pool with `ensure_connection` reduced to `connect()`;
* `redis-py, poll probe`: the same check in one system call (`poll(0)` on the socket: readable
  means unread data or a closed connection, as redis-py's probe finds), not three;
* `raw socket`: the command's bytes on a plain socket (one send, one recv), for the floor.

Prints CPU µs per call (process CPU, user + system), median of `--rounds` rounds that alternate
the four ways, so that a drifting machine favours none.

    python bench/gil_tax.py [--threads 16] [--calls 6000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REDIS_DB, REDIS_URL, flush_redis  # noqa: E402

SCRIPT = "return redis.call('INCR', KEYS[1])"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--calls", type=int, default=6000, help="calls per measurement, over all threads")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import redis

    class NoProbePool(redis.BlockingConnectionPool):
        def ensure_connection(self, connection):
            connection.connect()

    class PollProbeConnection(redis.Connection):
        def can_read(self, timeout=0):
            buffer = getattr(self._parser, "_buffer", None)
            if timeout or self._sock is None or buffer is None:
                return super().can_read(timeout)
            if buffer.unread_bytes():
                return True
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))

    flush_redis()
    sha = redis.Redis.from_url(REDIS_URL).script_load(SCRIPT)

    def via(pool_class, **kwargs):
        client = redis.Redis(connection_pool=pool_class.from_url(REDIS_URL, max_connections=64, timeout=30, **kwargs))
        return lambda: client.evalsha(sha, 1, "gil-tax")

    def raw():
        local = threading.local()
        command = f"*4\r\n$7\r\nEVALSHA\r\n$40\r\n{sha}\r\n$1\r\n1\r\n$7\r\ngil-tax\r\n".encode()

        def call():
            sock = getattr(local, "sock", None)
            if sock is None:
                sock = local.sock = socket.create_connection(("127.0.0.1", 6379))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(f"*2\r\n$6\r\nSELECT\r\n${len(str(REDIS_DB))}\r\n{REDIS_DB}\r\n".encode())
                sock.recv(64)
            sock.sendall(command)
            sock.recv(64)
        return call

    ways = {"redis-py": via(redis.BlockingConnectionPool), "redis-py, no probe": via(NoProbePool),
            "redis-py, poll probe": via(redis.BlockingConnectionPool, connection_class=PollProbeConnection),
            "raw socket": raw()}
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for threads in (1, args.threads):
            for name, call in ways.items():
                results.setdefault((name, threads), []).append(measure(call, threads, args.calls))
    flush_redis()
    print(f"CPU µs per EVALSHA (median of {args.rounds}; {args.calls} calls each)")
    print(f"| way | 1 thread | {args.threads} threads | {args.threads} threads / 1 |")
    print("|---|---|---|---|")
    for name in ways:
        alone = statistics.median(results[(name, 1)])
        crowd = statistics.median(results[(name, args.threads)])
        print(f"| {name} | {alone:.1f} | {crowd:.1f} | {crowd / alone:.2f} |")


def measure(call, threads: int, calls: int) -> float:
    per_thread = calls // threads
    for _ in range(20):
        call()  # connections open, script cached
    pool = [threading.Thread(target=lambda: [call() for _ in range(per_thread)]) for _ in range(threads)]
    cpu = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return 1e6 * (time.process_time() - cpu) / (per_thread * threads)


if __name__ == "__main__":
    main()
