"""kombu's crash on broker loss, avoided at its cause (worker/broker.py).

The state Celery's consumer leaves behind when the broker vanishes: `collect()` dropped the
transport's client while the default channel still holds delivered, unacked messages; then
`on_connection_error_after_connected` closes the connection again with `ignore_errors`. Stock
kombu 5.7 raises AttributeError('NoneType' ... 'hostname') there, which ends the worker
("Unrecoverable error"); with the guard it is a connection error that `ignore_errors` swallows.
"""

from __future__ import annotations

import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.common import ignore_errors

import worker.app  # noqa: F401 - installs the guard, as in every worker and producer process


def test_closing_a_collected_connection_with_unacked_messages_does_not_crash(redis_db):
    queue = Queue("guard-test", Exchange("guard-test"), "guard-test")
    conn = Connection(redis_db)
    channel = conn.default_channel
    Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key="guard-test", declare=[queue])
    message = channel.basic_get("guard-test", no_ack=False)
    assert message is not None and len(channel.qos._delivered) == 1  # delivered, not acked

    conn._do_close_transport()  # what collect() leaves behind when its own close failed part-way
    ignore_errors(conn, conn.close)  # what the consumer does next: must not raise AttributeError

    # The message was not lost: it is still recorded as unacked in Redis, so the visibility
    # timeout brings it back.
    assert redis.Redis.from_url(redis_db).hlen("unacked") == 1
