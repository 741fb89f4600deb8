"""localapi's overload mode: processor sharing, so latency grows with concurrency and nothing is refused."""

import asyncio
import threading

import httpx2
import openai
import pytest

import localapi
from localapi.__main__ import build_parser
from localapi.config import ServerConfig
from localapi.overload import ProcessorSharing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_requests_beyond_the_capacity_share_the_server_and_all_slow_down():
    async def scenario():
        clock = FakeClock()
        server = ProcessorSharing(capacity=2, clock=clock)
        loop = asyncio.get_running_loop()
        # Work of 1 s each; timers are driven by hand with the fake clock (the real ones are cancelled).
        tasks = [asyncio.create_task(server.serve(1.0)) for _ in range(3)]
        await asyncio.sleep(0)
        assert server.in_flight == 3 and server.speed() == pytest.approx(2 / 3)
        clock.now = 1.4  # alone, or two at a time, they would be done
        server._finish(loop)
        await asyncio.sleep(0)
        assert not any(task.done() for task in tasks)
        clock.now = 1.5  # 3 requests x 1 s of work at 2 requests' speed
        server._finish(loop)
        await asyncio.gather(*tasks)
        assert server.in_flight == 0 and server.max_in_flight == 3
        # Up to the capacity, each takes its own work.
        short = asyncio.create_task(server.serve(1.0))
        await asyncio.sleep(0)
        clock.now = 2.5
        server._finish(loop)
        await short
        server._timer.cancel() if server._timer else None

    asyncio.run(scenario())


def test_work_for_a_client_that_left_goes_on():
    async def scenario():
        clock = FakeClock()
        server = ProcessorSharing(capacity=1, clock=clock)
        task = asyncio.create_task(server.serve(100.0))
        await asyncio.sleep(0)
        task.cancel()  # the client timed out
        with pytest.raises(asyncio.CancelledError):
            await task
        assert server.in_flight == 1  # still generating, for nobody
        clock.now = 100.0
        server._finish(asyncio.get_running_loop())
        assert server.in_flight == 0

    asyncio.run(scenario())


def test_the_overload_server_answers_everyone_later_rather_than_refusing():
    # capacity 1, 100 ms each: 4 at once all finish after about 400 ms (a lower bound only).
    with localapi.running(ServerConfig(latency_ms=100, overload_capacity=1)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, http_client=httpx2.Client())
        took = []

        def one():
            import time

            started = time.monotonic()
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            took.append(time.monotonic() - started)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(took) == 4 and min(took) >= 0.3
        stats = server.stats()
        assert stats["accepted"] == 4 and stats["rate_limited"] == 0
        assert stats["overload"]["max_in_flight"] == 4 and stats["overload"]["capacity"] == 1


def test_overload_capacity_is_validated_and_on_the_cli():
    with pytest.raises(ValueError, match="overload_capacity"):
        ServerConfig(overload_capacity=0)
    args = build_parser().parse_args(["--overload-capacity", "4", "--latency-ms", "500"])
    assert ServerConfig(**vars(args)).overload_capacity == 4
    assert build_parser().parse_args([]).overload_capacity is None
