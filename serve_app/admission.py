"""Admission: a request's rate limits and key, and a turn's route and token reservation.

Two gates behind one protocol, picked by the deployment's config:

- ``ControlGate`` (the default, no Redis): one call to the control-store actor does it all, exact
  across ingress replicas because that actor is the only place the state lives. It costs a Ray
  hop (about 1-3 ms here) on every request.
- ``RedisGate`` (a ``redis_url`` is configured): the hot path stays in the ingress process, and
  a request costs one Redis round trip. One Lua script (``_ADMIT``) runs the IP's and the key's
  moving windows and, for a turn, takes its reservation against the day's used-token counter,
  which the control store mirrors into Redis each time it meters a commit; so limits and
  budgets are exact across replicas. Keys and session routes are cached per ingress replica: a
  revoked key stops working at once on the replica that revoked it and within
  ``AUTH_CACHE_TTL_S`` on the others; a quota change applies within the same time.

Why a script of our own and not ``limits``' Redis storage, which the control actor's in-process
limiter uses: ``limits`` checks one window per call and reports a window's remaining count in a
second call, so the IP, the key and their headers took three round trips, 1.9 ms of the 7.4 ms a
turn added over a bare Serve forward (benchmarks/api_bench.py). The windows are the same moving
windows: at most ``limit`` requests in any 60 s.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .backend import RESTARTING_RETRY_S, Control
from .control import today
from .errors import ApiError, QuotaExceededError
from .ratelimit import Decision

AUTH_CACHE_TTL_S = 2.0
# A route never moves (a session stays on its replica index) and a closed session's replica
# refuses it, so a route is cached long: at 5 s, a person's next message in a conversation
# missed the cache and cost a control-store call. The ingress forgets a route when it closes the
# session, deletes the agent, or cannot reach the replica (a deleted agent's, on another ingress).
ROUTE_CACHE_TTL_S = 300.0
CACHE_ENTRIES_MAX = 10_000
RESERVATION_TTL_S = 3_900.0  # a turn's wall-clock limit is at most an hour
REDIS_TIMEOUT_S = 2.0
WINDOW_MS = 60_000  # the rate limits' window: requests per minute
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

    def forget_routes(self, session_id: str | None = None, agent_id: str | None = None) -> None:
        """Drops a session's cached route, or every one of an agent's: the next request reads
        it from the control store again."""
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

    def forget_routes(self, session_id: str | None = None, agent_id: str | None = None) -> None:
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

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def drop_where(self, predicate: Any) -> None:
        for key in [k for k, (_, v) in self._entries.items() if predicate(v)]:
            del self._entries[key]


# One round trip admits a request: its moving windows (the client IP's, then the key's) and, for
# a turn of a user with a daily budget, its token reservation. A window is a sorted set of
# request ids scored by arrival (Redis's own clock, so ingress replicas on hosts whose clocks
# differ share one timeline); a request refused by a window is not recorded in it or in any
# window after it. A refused request's reset is when enough entries have left for one more (a
# window may hold more than its limit after the limit was lowered). Reservations are members
# "<id>:<tokens>" of a per-user-and-day sorted set scored by their expiry in seconds (the format
# the ingress had before this script, so replicas of both versions share a budget in a rollout).
# KEYS: n windows, then (optional) the day's used counter and reservation set.
# ARGV: member, window_ms, n, n limits, then (with a reservation) tokens, budget (-1: none;
# the ingress skips the reservation then),
# reservation member, reservation ttl s, day key ttl s.
# Returns {refused, limit, remaining, reset_ms, used, reserved}: refused is 0, the 1-based window
# that refused, or n + 1 for the budget; limit, remaining and reset_ms are the last window's.
# Every key a call names must live on one Redis server (a Redis Cluster would need hash tags).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local window_ms = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local limit, remaining, reset = 0, 0, 0
for i = 1, n do
  local key = KEYS[i]
  limit = tonumber(ARGV[3 + i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window_ms)
  local count = redis.call('ZCARD', key)
  if count >= limit then
    local frees = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    return {i, limit, 0, tonumber(frees[2]) + window_ms - now, 0, 0}
  end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window_ms)
  remaining = limit - count - 1
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  reset = tonumber(oldest[2]) + window_ms - now
end
if #KEYS == n then
  return {0, limit, remaining, reset, 0, 0}
end
local used_key, reserved_key = KEYS[n + 1], KEYS[n + 2]
local tokens = tonumber(ARGV[4 + n])
local budget = tonumber(ARGV[5 + n])
local now_s = now / 1000
redis.call('ZREMRANGEBYSCORE', reserved_key, '-inf', now_s)
local used = tonumber(redis.call('GET', used_key) or '0')
local reserved = 0
for _, held in ipairs(redis.call('ZRANGE', reserved_key, 0, -1)) do
  reserved = reserved + tonumber(string.match(held, ':(%d+)$'))
end
if budget >= 0 and used + reserved + tokens > budget then
  return {n + 1, limit, remaining, reset, used, reserved}
end
redis.call('ZADD', reserved_key, now_s + tonumber(ARGV[7 + n]), ARGV[6 + n])
redis.call('EXPIRE', reserved_key, ARGV[8 + n])
return {0, limit, remaining, reset, used, reserved}
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
    """Admission in the ingress process, with its shared state in Redis: one round trip (the
    ``_ADMIT`` script) for a caller whose key and session route this replica has cached; a
    first request also asks the control store for them, after its IP's window admitted it."""

    def __init__(
        self,
        control: Control,
        redis_url: str,
        *,
        client: Redis | None = None,
        auth_cache_ttl_s: float = AUTH_CACHE_TTL_S,
    ) -> None:
        """``client`` (default: one for ``redis_url``) is where admission's state lives."""
        self._control = control
        self._redis = client or Redis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._users = _TtlCache(auth_cache_ttl_s)
        self._routes = _TtlCache(ROUTE_CACHE_TTL_S)
        self._background: set[asyncio.Task[Any]] = set()

    async def _run(
        self, windows: list[tuple[str, int]], member: str, reservation: list[Any] | None = None
    ) -> tuple[int, Decision, int, int]:
        """Runs ``_ADMIT``: (the refusing step or 0, the last window's decision, used, reserved);
        ``reservation`` is [used key, reservation set, tokens, budget]."""
        keys = [key for key, _ in windows]
        args: list[Any] = [member, WINDOW_MS, len(windows), *(limit for _, limit in windows)]
        if reservation is not None:
            used_at, reserved_at, tokens, budget = reservation
            keys += [used_at, reserved_at]
            args += [tokens, budget, f"{member}:{tokens}", RESERVATION_TTL_S, DAY_KEY_TTL_S]
        async with _redis_errors():
            refused, limit, remaining, reset_ms, used, reserved = await self._admit(
                keys=keys, args=args
            )
        allowed = refused == 0 or refused == len(windows) + 1
        decision = Decision(allowed, int(limit), int(remaining), math.ceil(int(reset_ms) / 1000))
        return int(refused), decision, int(used), int(reserved)

    def _cached_user(self, api_key: str | None) -> tuple[bool, dict[str, Any] | None]:
        if api_key is None:
            return True, None
        found, user = self._users.get(_digest(api_key))
        return found, user

    async def _user(self, api_key: str) -> dict[str, Any] | None:
        user: dict[str, Any] | None = await self._control.call("authenticate", api_key)
        self._users.put(_digest(api_key), user)
        return user

    async def _admitted(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int,
        member: str,
        reservation: Callable[[dict[str, Any]], list[Any] | None],
    ) -> tuple[dict[str, Any] | None, Decision, tuple[int, int] | None]:
        """The IP's window, the key, the key's window and ``reservation(user)``'s tokens: (user or
        None, decision, (used, reserved) when the budget refused the reservation, else None)."""
        ip = ("hf:rl:ip:" + client_ip, ip_per_minute)
        found, user = self._cached_user(api_key)
        if not found or user is None:
            # The key is not known here yet: the IP's window first, so an unknown key's
            # requests are limited before they reach the control store.
            refused, decision, _, _ = await self._run([ip], member)
            if refused or api_key is None:
                return None, decision, None
            user = await self._user(api_key) if not found else None
            if user is None:
                return None, decision, None
            windows = [_key_window(user)]
        else:
            windows = [ip, _key_window(user)]
        held = reservation(user)
        refused, decision, used, reserved = await self._run(windows, member, held)
        if len(windows) == 2 and refused == 1:
            return None, decision, None  # the IP's window refused it
        if refused == len(windows) + 1:
            return user, decision, (used, reserved)
        return user, decision, None

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int
    ) -> tuple[dict[str, Any] | None, Decision]:
        member = _request_id()
        user, decision, _ = await self._admitted(
            api_key, client_ip, ip_per_minute, member, _nothing
        )
        return user, decision

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
        day = today()
        member = _request_id()
        cached, route = self._routes.get(session_id)
        taken: list[RedisReservation] = []

        def reserve(user: dict[str, Any]) -> list[Any] | None:
            # With the route cached, the reservation rides in the limits' round trip.
            budget = user["quotas"].get("tokens_per_day")
            if not cached or budget is None or route["owner"] != user["id"]:
                return None
            tokens = int(route["max_tokens"])
            taken.append(RedisReservation(_reserved_key(user["id"], day), f"{member}:{tokens}"))
            return [used_key(user["id"], day), taken[0].key, tokens, budget]

        user, decision, over = await self._admitted(
            api_key, client_ip, ip_per_minute, member, reserve
        )
        out: dict[str, Any] = {"user": user, "decision": decision, "route": None}
        if user is None or not decision.allowed:
            return out
        if not cached:
            route = await self._route(session_id)
        if route is None or route["owner"] != user["id"]:
            return out
        budget = user["quotas"].get("tokens_per_day")
        if budget is None:  # nothing to hold the turn against
            out.update(route=route, reservation=None)
            return out
        tokens = int(route["max_tokens"])
        if not taken:  # the route was not cached: a round trip for the reservation alone
            held = [used_key(user["id"], day), _reserved_key(user["id"], day), tokens, budget]
            refused, _, used, reserved = await self._run([], member, held)
            over = (used, reserved) if refused else None
            taken.append(RedisReservation(held[1], f"{member}:{tokens}"))
        if over is not None:
            used, reserved = over
            raise QuotaExceededError(
                f"this turn may use {tokens} tokens; {used} used and {reserved} reserved "
                f"today of your {budget} tokens per day"
            )
        out.update(route=route, reservation=taken[0])
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

    def forget_routes(self, session_id: str | None = None, agent_id: str | None = None) -> None:
        if session_id is not None:
            self._routes.drop(session_id)
        if agent_id is not None:
            self._routes.drop_where(lambda route: route["agent_id"] == agent_id)


def _request_id() -> str:
    """A window's member: 64 random bits (a window holds up to its limit of them)."""
    return uuid.uuid4().hex[:16]


def _digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()  # never keep plaintext keys


def _key_window(user: dict[str, Any]) -> tuple[str, int]:
    return "hf:rl:key:" + user["key_prefix"], int(user["quotas"].get("requests_per_minute", 100))


def _nothing(user: dict[str, Any]) -> None:
    return None
