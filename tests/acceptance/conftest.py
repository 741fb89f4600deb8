"""Acceptance fixtures: each test gets a broker of its own."""

import pytest

from tests.acceptance.helpers import PrivateRedis, free_port


@pytest.fixture
def private_redis(tmp_path):
    # free_port() releases the port before redis-server binds it: another test run on this
    # machine may take it in between. start() notices (the server on the port is not ours).
    for attempt in range(5):
        server = PrivateRedis(free_port(), tmp_path)
        try:
            server.start()
            break
        except AssertionError:
            server.stop()
            if attempt == 4:
                raise
    yield server
    server.stop()


@pytest.fixture
def redis_db(private_redis) -> str:
    """Overrides the shared-Redis fixture: a broker nobody else's workers listen to."""
    return private_redis.url
