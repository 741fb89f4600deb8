"""Acceptance fixtures: each test gets a broker of its own."""

import pytest

from tests.acceptance.helpers import PrivateRedis, free_port


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(private_redis) -> str:
    """Overrides the shared-Redis fixture: a broker nobody else's workers listen to."""
    return private_redis.url
