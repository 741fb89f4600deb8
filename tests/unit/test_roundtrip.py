"""One Redis round trip for several commands (worker/ratelimit/roundtrip.py), and what a row costs."""

from __future__ import annotations

import fakeredis
import pytest
import redis

import localapi
from tests.unit.test_generation import make_context, new_sweep, rows
from models import RowState, store
from worker import llm
from worker.context import IN_FLIGHT_KEY, InFlightEntry
from worker.generation import run_request
from worker.ratelimit.roundtrip import Reply, RoundTrip

COUNT = "return redis.call('INCR', KEYS[1])"


@pytest.fixture(params=["fakeredis", "redis"])
def client(request):
    if request.param == "fakeredis":
        return fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return redis.Redis.from_url(request.getfixturevalue("redis_db"))


def count_round_trips(client) -> list[int]:
    """Every command and every pipeline checks a connection out of the pool once."""
    checkouts = [0]
    pool = client.connection_pool
    original = pool.get_connection

    def counted(*args, **kwargs):
        checkouts[0] += 1
        return original(*args, **kwargs)

    pool.get_connection = counted
    return checkouts


def test_queued_commands_go_in_one_round_trip_and_answer_in_order(client):
    script = client.register_script(COUNT)
    script(keys=["n"])  # loaded once, as every process's first call does
    trips = count_round_trips(client)
    trip = RoundTrip(client)
    first = trip.script(script, ["n"], [], convert=int)
    trip.call("set", "plain", "v")
    second = trip.script(script, ["n"], [], convert=lambda n: int(n) * 10)
    assert len(trip) == 3
    with pytest.raises(RuntimeError):
        first.value  # not sent yet
    trip.execute()
    assert trips[0] == 1
    trip.execute()  # nothing queued any more: no round trip
    assert trips[0] == 1
    assert (first.value, second.value) == (2, 30)
    assert client.get("plain") == b"v"
    assert Reply.ready(7).value == 7


def test_a_script_the_server_lost_is_loaded_and_run_once(redis_db):
    """After a Redis restart the script cache is empty: the EVALSHA answers NOSCRIPT, the script is
    loaded and run again by itself, and the commands beside it are not sent twice."""
    client = redis.Redis.from_url(redis_db)
    script = client.register_script(COUNT)
    script(keys=["n"])
    client.script_flush()
    trip = RoundTrip(client)
    counted = trip.script(script, ["n"], [], convert=int)
    trip.call("incr", "beside")
    trip.execute()
    assert counted.value == 2
    assert client.get("beside") == b"1"


def test_an_error_answer_raises_once_the_others_are_read(client):
    client.set("text", "not a number")
    trip = RoundTrip(client)
    trip.call("incr", "text")
    after = trip.call("incr", "counter")
    with pytest.raises(redis.ResponseError):
        trip.execute()
    assert after.value == 1 and client.get("counter") == b"1"


def test_a_row_costs_two_redis_round_trips(tmp_path):
    """On an endpoint under the adaptive in-flight limit (no rate-limit headers, like a local or
    self-hosted server): one round trip before the call (in-flight entry, rate budget, slot),
    one after it (slot release and latency, token settle, failure streak, entry removal)."""
    with localapi.running() as server:
        ctx = make_context(tmp_path, server)
        sweep = new_sweep(ctx)
        run_request(ctx, sweep.id, 0)  # the scripts load and the SQL statements are built once
        trips = count_round_trips(ctx.redis)
        entry = InFlightEntry(sweep.id, "task-1")
        outcome = run_request(ctx, sweep.id, 1, entry=entry)
        assert outcome.stored and rows(ctx, sweep)[1].state == RowState.OK
        assert trips[0] == 2
        entry.close(ctx.redis)
        assert trips[0] == 2  # removed with the answer's bookkeeping already
        assert ctx.redis.zcard(IN_FLIGHT_KEY.format(sweep_id=sweep.id)) == 0
        endpoint = llm.budget_key(store.sweep_config(sweep).model.name, ctx.settings)
        assert ctx.in_flight_limiter.state(endpoint)["in_flight"] == 0  # the slot was given back
