"""The Redis clients' connection pool queues callers instead of failing (issue 16's probe: at
400 concurrent users an ingress's default pool raised ``MaxConnectionsError`` for 6 % of
requests). Against a real redis-server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from actors.store.redis import pooled_client

from .conftest import RedisServer

pytestmark = pytest.mark.integration

CALLERS = 40
POOL = 2


async def _slow_calls(client: aioredis.Redis) -> list[object]:
    # Each call holds its connection ~50 ms (a blocking pop that times out), so 40 at once
    # need 20 times the pool.
    calls = [client.blpop([f"hf-pool-test-{i}"], timeout=0.05) for i in range(CALLERS)]
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_callers_past_the_pool_wait_for_a_connection(redis_server: RedisServer) -> None:
    client = pooled_client(redis_server.url, timeout_s=10.0, max_connections=POOL)
    try:
        answers = await _slow_calls(client)
    finally:
        await client.aclose()
    assert answers == [None] * CALLERS  # every one answered (an empty pop), none refused


async def test_the_default_pool_would_refuse_them(redis_server: RedisServer) -> None:
    """What the test above guards against: redis-py's own pool fails at its size."""
    client = aioredis.Redis.from_url(redis_server.url, max_connections=POOL)
    try:
        answers = await _slow_calls(client)
    finally:
        await client.aclose()
    assert any(isinstance(a, RedisConnectionError) for a in answers), answers


async def test_a_caller_that_waits_too_long_gets_an_error_not_a_hang(
    redis_server: RedisServer,
) -> None:
    client = pooled_client(redis_server.url, timeout_s=5.0, max_connections=1, wait_s=0.2)
    try:
        # One holds the only connection for 1 s; the other waits 0.2 s for it, then fails.
        answers = await asyncio.gather(
            client.blpop(["hf-pool-test-a"], timeout=1),
            client.blpop(["hf-pool-test-b"], timeout=1),
            return_exceptions=True,
        )
    finally:
        await client.aclose()
    assert answers[0] is None and isinstance(answers[1], RedisConnectionError), answers
