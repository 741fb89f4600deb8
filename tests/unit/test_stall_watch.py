"""The stall watchdog: re-send a sweep's missing requests only when nothing can still deliver them."""

import fakeredis

from producer.recovery import StallWatch, broker_idle


def snap(**overrides):
    return {"name": "s", "state": "running", "remaining": 3, "in_flight": 0, **overrides}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_resumes_once_after_the_stall_has_lasted():
    clock, sent = Clock(), []
    watch = StallWatch(lambda: True, lambda: sent.append(1) or 3, stall_seconds=60, clock=clock)
    watch(snap())
    clock.now = 59
    watch(snap())
    assert sent == []
    clock.now = 61
    watch(snap())
    assert sent == [1] and watch.resumed == 3
    clock.now = 62
    watch(snap())  # the clock starts over after a resume
    assert sent == [1]


def test_any_sign_of_life_resets_the_clock():
    clock, sent = Clock(), []
    watch = StallWatch(lambda: True, lambda: sent.append(1) or 1, stall_seconds=10, clock=clock)
    watch(snap())
    clock.now = 9
    watch(snap(in_flight=2))
    clock.now = 15
    watch(snap())
    clock.now = 20
    watch(snap())
    assert sent == []
    for state in ("done", "finalizing"):
        clock.now += 100
        watch(snap(state=state))
    watch(snap(remaining=0))
    assert sent == []


def test_broker_idle_sees_queued_priority_and_unacked_messages():
    client = fakeredis.FakeRedis()
    assert broker_idle(client, ("gridtune",))
    client.lpush("gridtune\x06\x163", b"m")
    assert not broker_idle(client, ("gridtune",))
    client.delete("gridtune\x06\x163")
    client.hset("unacked", "tag", b"m")
    assert not broker_idle(client, ("gridtune",))
    client.delete("unacked")
    client.lpush("other-queue", b"m")
    assert broker_idle(client, ("gridtune",))
