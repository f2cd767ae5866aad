"""Redis session store: direct from every replica, for deployments that need the store to be HA.

A commit is one Lua script, so the version check, the idempotency check and the append happen
atomically in Redis. Durability is the server's: run it with ``appendonly yes`` and
``appendfsync always`` for a commit to survive a crash of Redis itself (the test server does).

Keys, per session: ``hf:s:{id}`` (hash: agent, owner, created_at, version, closed),
``hf:t:{id}`` (list of turn JSON, in order), ``hf:k:{id}`` (hash: idempotency key -> index),
``hf:i:{id}`` (hash: turn id -> index; turns committed before it existed are not found by id).
The usage outbox, for every session: ``hf:usage`` (hash: record id -> record JSON) and
``hf:usage:at`` (sorted set: record id scored by when it was written).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from hyperfleet.errors import (
    ConflictError,
    IdempotencyConflictError,
    NotFoundError,
    StaleSessionError,
    StoreError,
)
from hyperfleet.metering import UsageRecord, usage_to_json

from .base import SessionRecord, TurnRecord, readable_usage

TIMEOUT_S = 5.0
MAX_LIST = 1_000

OUTBOX_KEY = "hf:usage"
OUTBOX_AT_KEY = "hf:usage:at"

# KEYS: the session, its turns, its keys, its turn ids, then (with a usage record) the outbox and
# its index. ARGV: expected version, turn JSON, idempotency key or '', turn id, then record id,
# JSON, written at.
_COMMIT = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version or redis.call('HGET', KEYS[1], 'closed') == '1' then
  return redis.error_reply('NOTFOUND')
end
if tonumber(version) ~= tonumber(ARGV[1]) then
  return redis.error_reply('STALE ' .. version)
end
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then
  return redis.error_reply('DUPKEY')
end
local index = tonumber(version) + 1
redis.call('RPUSH', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[3], index) end
redis.call('HSET', KEYS[4], ARGV[4], index)
redis.call('HSET', KEYS[1], 'version', index)
if #KEYS == 6 then
  redis.call('HSET', KEYS[5], ARGV[5], ARGV[6])
  redis.call('ZADD', KEYS[6], ARGV[7], ARGV[5])
end
return index
"""

# KEYS: the session. ARGV: how many event ids to add. A closed or unknown session is refused.
_RESERVE = """
if redis.call('HGET', KEYS[1], 'version') == false or redis.call('HGET', KEYS[1], 'closed') == '1'
then
  return redis.error_reply('NOTFOUND')
end
return redis.call('HINCRBY', KEYS[1], 'seq', ARGV[1])
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _keys(session_id: str) -> list[str]:
    return [
        f"hf:s:{session_id}",
        f"hf:t:{session_id}",
        f"hf:k:{session_id}",
        f"hf:i:{session_id}",
    ]


POOL_CONNECTIONS = 64  # per process; callers past it wait for one (up to their timeout)


def pooled_client(
    url: str,
    timeout_s: float,
    max_connections: int = POOL_CONNECTIONS,
    wait_s: float | None = None,
) -> aioredis.Redis:
    """An asyncio Redis client whose connection pool queues a caller for a free connection (for
    up to ``wait_s``, default ``timeout_s``) instead of failing: redis-py's default pool raises
    ``MaxConnectionsError`` at once when its 100 connections are in use, which a few hundred
    concurrent sessions on one ingress replica reached (issue 16's probe: 6 % of requests
    answered 503). Every connection and command is bounded by ``timeout_s``."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s if wait_s is None else wait_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose closes both


class RedisSessionStore:
    def __init__(
        self, url: str, timeout_s: float = TIMEOUT_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock  # when an outbox record was written
        self._redis = pooled_client(url, timeout_s)
        self._commit = self._redis.register_script(_COMMIT)
        self._reserve = self._redis.register_script(_RESERVE)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def create_session(self, record: SessionRecord) -> None:
        key = _keys(record.session_id)[0]
        mapping = {
            "agent_id": record.agent_id,
            "owner": record.owner,
            "created_at": repr(record.created_at),
            "version": record.version,
            "closed": int(record.closed),
            "seq": record.seq_reserved,
        }
        try:
            created = await self._redis.hsetnx(key, "agent_id", record.agent_id)
            if not created:
                raise ConflictError(f"session {record.session_id} exists")
            await self._redis.hset(key, mapping=mapping)  # type: ignore[arg-type]
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e

    async def get_session(self, session_id: str) -> SessionRecord | None:
        try:
            data = await self._redis.hgetall(_keys(session_id)[0])
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e
        if not data or b"version" not in data:
            return None
        return SessionRecord(
            session_id=session_id,
            agent_id=_text(data[b"agent_id"]),
            owner=_text(data[b"owner"]),
            created_at=float(data[b"created_at"]),
            version=int(data[b"version"]),
            closed=data.get(b"closed") == b"1",
            seq_reserved=int(data.get(b"seq", 0)),
        )

    async def reserve_seq(self, session_id: str, count: int) -> int:
        try:
            top = await self._reserve(keys=[_keys(session_id)[0]], args=[count])
        except ResponseError as e:
            raise NotFoundError(f"session {session_id} is closed or unknown") from e
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e
        return int(top)

    async def commit_turn(
        self, turn: TurnRecord, expected_version: int, usage: UsageRecord | None = None
    ) -> None:
        if turn.index != expected_version + 1:
            raise StaleSessionError(
                f"turn index {turn.index} does not follow version {expected_version}",
                session_id=turn.session_id,
            )
        keys = _keys(turn.session_id)
        args: list[str | int | float] = [
            expected_version,
            turn.to_json(),
            turn.idempotency_key or "",
            turn.turn_id,
        ]
        if usage is not None:
            keys += [OUTBOX_KEY, OUTBOX_AT_KEY]
            args += [usage.id, usage_to_json(usage), self._clock()]
        try:
            await self._commit(keys=keys, args=args)
        except ResponseError as e:
            text = str(e)
            if text.startswith("NOTFOUND"):
                raise NotFoundError(f"session {turn.session_id} is closed or unknown") from e
            if text.startswith("STALE"):
                raise StaleSessionError(
                    f"session {turn.session_id} is at version {text.split()[1]}, "
                    f"not {expected_version}",
                    session_id=turn.session_id,
                ) from e
            if text.startswith("DUPKEY"):
                raise IdempotencyConflictError(
                    f"idempotency key {turn.idempotency_key!r} was already used"
                ) from e
            raise StoreError(f"redis: {e}") from e
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e

    async def find_turn(self, session_id: str, idempotency_key: str) -> TurnRecord | None:
        _, turns, keys, _ = _keys(session_id)
        return await self._turn_by(keys, idempotency_key, turns)

    async def get_turn(self, session_id: str, turn_id: str) -> TurnRecord | None:
        _, turns, _, ids = _keys(session_id)
        return await self._turn_by(ids, turn_id, turns)

    async def _turn_by(self, index: str, field: str, turns: str) -> TurnRecord | None:
        """The turn whose index the hash ``index`` holds under ``field``."""
        try:
            found = await self._redis.hget(index, field)
            if found is None:
                return None
            body = await self._redis.lindex(turns, int(found) - 1)
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e
        return None if body is None else TurnRecord.from_json(body)

    async def list_turns(
        self, session_id: str, after: int = 0, limit: int | None = None
    ) -> list[TurnRecord]:
        count = min(limit or MAX_LIST, MAX_LIST)
        try:
            bodies = await self._redis.lrange(_keys(session_id)[1], after, after + count - 1)
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e
        return [TurnRecord.from_json(b) for b in bodies]

    async def record_usage(self, record: UsageRecord) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(OUTBOX_KEY, record.id, usage_to_json(record))
                pipe.zadd(OUTBOX_AT_KEY, {record.id: self._clock()})
                await pipe.execute()
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e

    async def unmetered_usage(self, before: float, limit: int) -> list[UsageRecord]:
        try:
            ids: list[bytes] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                OUTBOX_AT_KEY, "-inf", f"({before!r}", start=0, num=min(limit, MAX_LIST)
            )
            bodies = await self._redis.hmget(OUTBOX_KEY, ids) if ids else []
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e
        return readable_usage(b for b in bodies if b is not None)

    async def ack_usage(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(OUTBOX_KEY, *ids)
                pipe.zrem(OUTBOX_AT_KEY, *ids)
                await pipe.execute()
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e

    async def close_session(self, session_id: str) -> None:
        key = _keys(session_id)[0]
        try:
            if await self._redis.exists(key):
                await self._redis.hset(key, "closed", 1)
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as e:
            raise StoreError(f"redis: {e}") from e
