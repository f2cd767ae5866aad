"""Admission: a request's rate limits and key, and a turn's route and token reservation.

Two gates behind one protocol, picked by the deployment's config:

- ``ControlGate`` (the default, no Redis): one call to the control-store actor does it all, exact
  across ingress replicas because that actor is the only place the state lives. It costs a Ray
  hop (about 1-3 ms here) on every request.
- ``RedisGate`` (a ``redis_url`` is configured): the hot path stays in the ingress process.
  ``limits``' moving window runs in Redis, so limits are exact across replicas; a turn's
  reservation is checked and taken by one Lua script against the day's used-token counter, which
  the control store mirrors into Redis each time it meters a commit. Keys and session routes are
  cached per ingress replica: a revoked key stops working at once on the replica that revoked
  it and within ``AUTH_CACHE_TTL_S`` on the others; a quota change applies within the same time.

Reservations expire after ``RESERVATION_TTL_S`` (longer than any turn may run), so an ingress
replica that dies between taking a reservation and releasing it cannot hold a user's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .backend import RESTARTING_RETRY_S, Control
from .control import today
from .errors import ApiError, QuotaExceededError
from .ratelimit import Decision

AUTH_CACHE_TTL_S = 2.0
ROUTE_CACHE_TTL_S = 5.0
CACHE_ENTRIES_MAX = 10_000
RESERVATION_TTL_S = 3_900.0  # a turn's wall-clock limit is at most an hour
REDIS_TIMEOUT_S = 2.0
DAY_KEY_TTL_S = 3 * 86_400


class Gate(Protocol):
    """Admission for the ingress. Every method is bounded by a timeout and raises ``ApiError``
    (503) when its backend cannot be reached, never hangs a request."""

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int
    ) -> tuple[dict[str, Any] | None, Decision]:
        """The per-IP limit, then the key, then the key's own limit: (user or None, decision)."""
        ...

    async def begin_message(
        self, api_key: str | None, client_ip: str, ip_per_minute: int, session_id: str
    ) -> dict[str, Any]:
        """``admit``, the session's route (None when unknown or not the caller's) and, when
        admitted, the turn's reservation; raises ``QuotaExceededError`` over budget."""
        ...

    def release(self, reservation: Any) -> None:
        """Ends a reservation without waiting (the turn's usage is metered at its commit)."""
        ...

    def forget_key(self, prefix: str) -> None:
        """Drops a revoked key from any cache, so it stops working here at once."""
        ...


class ControlGate:
    """Everything in the control-store actor, one call per request."""

    def __init__(self, control: Control) -> None:
        self._control = control

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int
    ) -> tuple[dict[str, Any] | None, Decision]:
        user, decision = await self._control.call("admit", api_key, client_ip, ip_per_minute)
        return user, decision

    async def begin_message(
        self, api_key: str | None, client_ip: str, ip_per_minute: int, session_id: str
    ) -> dict[str, Any]:
        begun: dict[str, Any] = await self._control.call(
            "begin_message", api_key, client_ip, ip_per_minute, session_id
        )
        return begun

    def release(self, reservation: Any) -> None:
        self._control.fire("release", reservation)

    def forget_key(self, prefix: str) -> None:
        return None


class _TtlCache:
    """A bounded LRU whose entries expire; per ingress replica, so only for data that may be
    briefly stale."""

    def __init__(self, ttl_s: float, max_entries: int = CACHE_ENTRIES_MAX) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, Any]:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        self._entries.move_to_end(key)
        return True, entry[1]

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = (time.monotonic() + self._ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop_where(self, predicate: Any) -> None:
        for key in [k for k, (_, v) in self._entries.items() if predicate(v)]:
            del self._entries[key]


# Reservations are members "<id>:<tokens>" of a per-user-and-day sorted set scored by their
# expiry. KEYS: used counter, reservation set. ARGV: tokens, budget (-1: none), now, expiry,
# member, key ttl. Returns {admitted, used, reserved}.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local reserved = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  reserved = reserved + tonumber(string.match(member, ':(%d+)$'))
end
local tokens = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
if budget >= 0 and used + reserved + tokens > budget then
  return {0, used, reserved}
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, used, reserved}
"""


@contextlib.asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError, TimeoutError) as e:
        raise ApiError(
            503,
            "unavailable",
            f"the admission store is not reachable right now ({type(e).__name__})",
            retry_after_s=RESTARTING_RETRY_S,
        ) from e


def used_key(user_id: str, day: str) -> str:
    """The Redis key of a user's tokens used on ``day`` (the control store mirrors it)."""
    return f"hf:used:{user_id}:{day}"


def _reserved_key(user_id: str, day: str) -> str:
    return f"hf:reserved:{user_id}:{day}"


@dataclass(frozen=True)
class RedisReservation:
    key: str
    member: str


class RedisGate:
    """Admission in the ingress process, with its shared state in Redis."""

    def __init__(self, control: Control, redis_url: str) -> None:
        self._control = control
        self._redis = Redis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        storage = RedisStorage(
            "async+" + redis_url,
            implementation="redispy",
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._reserve = self._redis.register_script(_RESERVE)
        self._users = _TtlCache(AUTH_CACHE_TTL_S)
        self._routes = _TtlCache(ROUTE_CACHE_TTL_S)
        self._background: set[asyncio.Task[Any]] = set()

    async def _hit(self, key: str, per_minute: int, stats: bool) -> Decision:
        item = RateLimitItemPerMinute(per_minute)
        async with _redis_errors():
            allowed = await self._limiter.hit(item, key)
            if not stats and allowed:
                return Decision(True, per_minute, per_minute, 0)
            reset_at, remaining = await self._limiter.get_window_stats(item, key)
        reset_s = max(0, math.ceil(reset_at - time.time()))
        return Decision(allowed, per_minute, max(0, remaining), reset_s)

    async def _user(self, api_key: str) -> dict[str, Any] | None:
        digest = hashlib.sha256(api_key.encode()).hexdigest()  # never keep plaintext keys
        found, user = self._users.get(digest)
        if not found:
            user = await self._control.call("authenticate", api_key)
            self._users.put(digest, user)
        return user  # type: ignore[no-any-return]

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int
    ) -> tuple[dict[str, Any] | None, Decision]:
        by_ip = await self._hit("ip:" + client_ip, ip_per_minute, stats=False)
        if not by_ip.allowed:
            return None, by_ip
        user = await self._user(api_key) if api_key else None
        if user is None:
            return None, by_ip
        per_key = int(user["quotas"].get("requests_per_minute", 100))
        return user, await self._hit("key:" + user["key_prefix"], per_key, stats=True)

    async def _route(self, session_id: str) -> dict[str, Any] | None:
        found, route = self._routes.get(session_id)
        if not found:
            route = await self._control.call("session_route", session_id)
            if route is not None:  # unknown ids are not cached: they may be created next
                self._routes.put(session_id, route)
        return route  # type: ignore[no-any-return]

    async def begin_message(
        self, api_key: str | None, client_ip: str, ip_per_minute: int, session_id: str
    ) -> dict[str, Any]:
        user, decision = await self.admit(api_key, client_ip, ip_per_minute)
        out: dict[str, Any] = {"user": user, "decision": decision, "route": None}
        if user is None or not decision.allowed:
            return out
        route = await self._route(session_id)
        if route is None or route["owner"] != user["id"]:
            return out
        budget = user["quotas"].get("tokens_per_day")
        if budget is None:  # nothing to hold the turn against: skip the round trip
            out.update(route=route, reservation=None)
            return out
        day = today()
        tokens = int(route["max_tokens"])
        now = time.time()
        member = f"{uuid.uuid4().hex}:{tokens}"
        key = _reserved_key(user["id"], day)
        args = [tokens, int(budget), now, now + RESERVATION_TTL_S]
        async with _redis_errors():
            admitted, used, reserved = await self._reserve(
                keys=[used_key(user["id"], day), key], args=[*args, member, DAY_KEY_TTL_S]
            )
        if not admitted:
            raise QuotaExceededError(
                f"this turn may use {tokens} tokens; {used} used and {reserved} reserved "
                f"today of your {budget} tokens per day"
            )
        out.update(route=route, reservation=RedisReservation(key, member))
        return out

    def release(self, reservation: Any) -> None:
        if isinstance(reservation, RedisReservation):
            # Not awaited: a lost release only holds budget until the reservation expires.
            task = asyncio.get_running_loop().create_task(self._zrem(reservation))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _zrem(self, reservation: RedisReservation) -> None:
        await self._redis.zrem(reservation.key, reservation.member)

    def forget_key(self, prefix: str) -> None:
        self._users.drop_where(lambda user: user is not None and user["key_prefix"] == prefix)
