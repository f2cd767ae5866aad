"""Admission: a request's rate limits and key, and a turn's route and token reservation.

Two gates behind one protocol (``Gate``), picked by the deployment's config, and held to one
contract by one conformance suite (``tests/integration/test_admission_conformance.py``):

- ``ControlGate`` (the default, no Redis): one call to the control-store actor does it all, exact
  across ingress replicas because that actor is the only place the state lives (its windows are
  ``ratelimit.MovingWindows``, its reservations SQLite rows). It costs a Ray hop (about 1-3 ms
  here) on every request.
- ``RedisGate`` (a ``redis_url`` is configured): the hot path stays in the ingress process, and
  a request costs one Redis round trip. One Lua script (``_ADMIT``) runs the IP's and the user's
  moving windows and, for a turn, takes its reservation against the day's used-token counter,
  which the control store mirrors into Redis each time it meters a commit
  (``redis_budget.py``); so limits and budgets are exact across replicas. Keys and session
  routes are cached per ingress replica: a revoked key stops working, and a quota change applies,
  at once on the replica that made the change and within ``AUTH_CACHE_TTL_S`` on the others.

Why a script of our own and not the ``limits`` library's Redis storage: ``limits`` checks one
window per call and reports a window's remaining count in a second call, so the IP, the user and
their headers took three round trips, 1.9 ms of the 7.4 ms a turn added over a bare Serve forward
(benchmarks/api_bench.py). The script's windows are the same moving windows as
``MovingWindows`` (``ratelimit.py`` states the rules both follow).

Reservations (``hyperfleet.metering.Reservation``, one type for both gates) expire after
``RESERVATION_TTL_S``, so an ingress replica that dies between taking a reservation and
releasing it cannot hold a user's budget.
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
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from actors.store.redis import pooled_client
from hyperfleet.metering import RESERVATION_TTL_S, Reservation, utc_day

from .errors import unavailable
from .ratelimit import NOT_LIMITED, WINDOW_MS, Decision, user_window
from .records import Admission, Route, User, over_budget
from .redis_budget import DAY_KEY_TTL_S, reservation_member, reserved_key, used_key

AUTH_CACHE_TTL_S = 2.0
# A route never moves (a session stays on its replica index) and a closed session's replica
# refuses it, so a route is cached long: at 5 s, a person's next message in a conversation
# missed the cache and cost a control-store call. The ingress forgets a route when it closes the
# session, deletes the agent, or cannot reach the replica (a deleted agent's, on another ingress).
ROUTE_CACHE_TTL_S = 300.0
CACHE_ENTRIES_MAX = 10_000
REDIS_TIMEOUT_S = 2.0


class ControlClient(Protocol):
    """What the gates ask the control store (``backend.Control``: an actor call each)."""

    async def authenticate(self, api_key: str) -> User | None: ...

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int | None
    ) -> Admission: ...

    async def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission: ...

    async def get_route(self, session_id: str) -> Route | None: ...

    def release_soon(self, reservation: Reservation) -> None: ...


class Gate(Protocol):
    """Admission for the ingress. Every method is bounded by a timeout and raises ``ApiError``
    (503) when its backend cannot be reached, never hangs a request.

    The contract both gates keep: the client address's window first (a request it refuses is
    not looked up), then the key, then its user's window, one per user whichever key a request
    carries (``ratelimit.py``'s rules); a
    turn's reservation only for an admitted caller's own session and only when the user has a
    ``tokens_per_day``; refused (``Admission.over_budget``) when used + reserved + the turn's
    ``max_tokens`` exceeds it (the request still counts in its windows)."""

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int | None
    ) -> Admission:
        """The per-IP limit (none when ``ip_per_minute`` is None: an exempt address), then the
        key, then its user's limit."""
        ...

    async def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission:
        """``admit``, the session's route (None when unknown or not the caller's) and, when
        admitted, the turn's reservation (the agent's ``max_tokens`` and ``input_tokens``, the
        message's estimate: ``hyperfleet.metering.estimate_tokens``) or why the budget refused
        it."""
        ...

    def release(self, reservation: Reservation | None) -> None:
        """Ends a reservation without waiting (the turn's usage is metered at its commit)."""
        ...

    async def flush(self) -> None:
        """Waits until every release made so far has taken effect."""
        ...

    def forget_key(self, prefix: str) -> None:
        """Drops a revoked key from any cache, so it stops working here at once."""
        ...

    def forget_user(self, user_id: str) -> None:
        """Drops a user whose quotas changed from any cache, so they apply here at once."""
        ...

    def forget_routes(self, session_id: str | None = None, agent_id: str | None = None) -> None:
        """Drops a session's cached route, or every one of an agent's: the next request reads
        it from the control store again."""
        ...


class ControlGate:
    """Everything in the control-store actor, one call per request."""

    def __init__(self, control: ControlClient) -> None:
        self._control = control

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int | None
    ) -> Admission:
        return await self._control.admit(api_key, client_ip, ip_per_minute)

    async def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission:
        return await self._control.begin_message(
            api_key, client_ip, ip_per_minute, session_id, input_tokens
        )

    def release(self, reservation: Reservation | None) -> None:
        if reservation is not None:
            self._control.release_soon(reservation)

    async def flush(self) -> None:
        return None  # the actor runs this replica's calls in order: the next one sees a release

    def forget_key(self, prefix: str) -> None:
        return None

    def forget_user(self, user_id: str) -> None:
        return None  # every call reads the user from the store

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

    def drop_where(self, predicate: Callable[[Any], bool]) -> None:
        for key in [k for k, (_, v) in self._entries.items() if predicate(v)]:
            del self._entries[key]


# One round trip admits a request: its moving windows (the client IP's, then the user's) and, for
# a turn of a user with a daily budget, its token reservation. A window is a sorted set of
# request ids scored by arrival in ms (Redis's own clock unless the caller gives one, so ingress
# replicas on hosts whose clocks differ share one timeline); a request refused by a window is not
# recorded in it or in any window after it. A refused request's reset is when enough entries have
# left for one more (a window may hold more than its limit after the limit was lowered).
# Reservations are members "<id>:<tokens>" of a per-user-and-day sorted set scored by their
# expiry in seconds. ``ratelimit.py`` states the rules; ``MovingWindows`` is the same algorithm.
# KEYS: n windows, then (optional) the day's used counter and reservation set.
# ARGV: now in ms ('' for Redis's TIME), member, window_ms, n, n limits, then (with a
# reservation) tokens, budget, reservation member, reservation ttl s, day key ttl s.
# Returns {refused, limit, remaining, reset_ms, used, reserved}: refused is 0, the 1-based window
# that refused, or n + 1 for the budget; limit, remaining and reset_ms are the last window's.
# Every key a call names must live on one Redis server (a Redis Cluster would need hash tags).
_ADMIT = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local member = ARGV[2]
local window_ms = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local limit, remaining, reset = 0, 0, 0
for i = 1, n do
  local key = KEYS[i]
  limit = tonumber(ARGV[4 + i])
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
local tokens = tonumber(ARGV[5 + n])
local budget = tonumber(ARGV[6 + n])
local now_s = now / 1000
redis.call('ZREMRANGEBYSCORE', reserved_key, '-inf', now_s)
local used = tonumber(redis.call('GET', used_key) or '0')
local reserved = 0
for _, held in ipairs(redis.call('ZRANGE', reserved_key, 0, -1)) do
  reserved = reserved + tonumber(string.match(held, ':(%d+)$'))
end
if used + reserved + tokens > budget then
  return {n + 1, limit, remaining, reset, used, reserved}
end
redis.call('ZADD', reserved_key, now_s + tonumber(ARGV[8 + n]), ARGV[7 + n])
redis.call('EXPIRE', reserved_key, ARGV[9 + n])
return {0, limit, remaining, reset, used, reserved}
"""

# A turn's reservation and the budget it is taken against.
_Hold = tuple[Reservation, int]


@contextlib.asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError, TimeoutError) as e:
        raise unavailable("the admission store", e) from e


class RedisGate:
    """Admission in the ingress process, with its shared state in Redis: one round trip (the
    ``_ADMIT`` script) for a caller whose key and session route this replica has cached; a
    first request also asks the control store for them, after its IP's window admitted it."""

    def __init__(
        self,
        control: ControlClient,
        redis_url: str,
        *,
        client: Redis | None = None,
        auth_cache_ttl_s: float = AUTH_CACHE_TTL_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``client`` (default: one for ``redis_url``) is where admission's state lives.
        ``clock`` (seconds since the epoch) times the windows, the reservations and the budget's
        day; None: Redis's own clock for the first two and this host's for the day (tests pass
        a fake one)."""
        self._control = control
        self._redis = client or pooled_client(redis_url, REDIS_TIMEOUT_S)
        self._admit = self._redis.register_script(_ADMIT)
        self._clock = clock
        self._users = _TtlCache(auth_cache_ttl_s)
        self._routes = _TtlCache(ROUTE_CACHE_TTL_S)
        self._background: set[asyncio.Task[Any]] = set()

    async def _run(
        self, windows: list[tuple[str, int]], member: str, hold: _Hold | None = None
    ) -> tuple[int, Decision, int, int]:
        """Runs ``_ADMIT``: (the refusing step or 0, the last window's decision, used, reserved)."""
        now_ms = "" if self._clock is None else str(int(self._clock() * 1000))
        keys = [key for key, _ in windows]
        args: list[Any] = [now_ms, member, WINDOW_MS, len(windows)]
        args += [limit for _, limit in windows]
        if hold is not None:
            reservation, budget = hold
            keys += [
                used_key(reservation.user_id, reservation.day),
                reserved_key(reservation.user_id, reservation.day),
            ]
            args += [reservation.tokens, budget, reservation_member(reservation)]
            args += [RESERVATION_TTL_S, DAY_KEY_TTL_S]
        async with _redis_errors():
            refused, limit, remaining, reset_ms, used, reserved = await self._admit(
                keys=keys, args=args
            )
        allowed = refused == 0 or refused == len(windows) + 1
        decision = Decision(allowed, int(limit), int(remaining), math.ceil(int(reset_ms) / 1000))
        return int(refused), decision, int(used), int(reserved)

    def _today(self) -> str:
        return utc_day(time.time() if self._clock is None else self._clock())

    def _cached_user(self, api_key: str | None) -> tuple[bool, User | None]:
        if api_key is None:
            return True, None
        found, user = self._users.get(_digest(api_key))
        return found, user

    async def _user(self, api_key: str) -> User | None:
        user = await self._control.authenticate(api_key)
        self._users.put(_digest(api_key), user)
        return user

    async def _admitted(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        member: str,
        hold: Callable[[User], _Hold | None],
    ) -> tuple[User | None, Decision, tuple[int, int] | None]:
        """The IP's window (none for an exempt address), the key, its user's window and
        ``hold(user)``'s reservation: (user or None, decision, (used, reserved) when the budget
        refused the reservation, else None)."""
        ip = [] if ip_per_minute is None else [("hf:rl:ip:" + client_ip, ip_per_minute)]
        found, user = self._cached_user(api_key)
        if not found or user is None:
            # The key is not known here yet: the IP's window first, so an unknown key's
            # requests are limited before they reach the control store.
            decision = NOT_LIMITED
            if ip:
                refused, decision, _, _ = await self._run(ip, member)
                if refused:
                    return None, decision, None
            if api_key is None:
                return None, decision, None
            user = await self._user(api_key) if not found else None
            if user is None:
                return None, decision, None
            windows = [_user_window(user)]
        else:
            windows = [*ip, _user_window(user)]
        refused, decision, used, reserved = await self._run(windows, member, hold(user))
        if len(windows) == 2 and refused == 1:
            return None, decision, None  # the IP's window refused it
        if refused == len(windows) + 1:
            return user, decision, (used, reserved)
        return user, decision, None

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int | None
    ) -> Admission:
        user, decision, _ = await self._admitted(
            api_key, client_ip, ip_per_minute, _request_id(), _no_hold
        )
        return Admission(user, decision)

    async def _route(self, session_id: str) -> Route | None:
        found, route = self._routes.get(session_id)
        if not found:
            route = await self._control.get_route(session_id)
            if route is not None:  # unknown ids are not cached: they may be created next
                self._routes.put(session_id, route)
        return route  # type: ignore[no-any-return]

    async def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission:
        day = self._today()
        member = _request_id()
        cached, known = self._routes.get(session_id)
        taken: list[_Hold] = []

        def hold(user: User) -> _Hold | None:
            # With the route cached, the reservation rides in the limits' round trip.
            budget = user.tokens_per_day
            if not cached or budget is None or known.owner != user.id:
                return None
            tokens = known.max_tokens + input_tokens
            taken.append((Reservation(member, user.id, day, tokens, "redis"), budget))
            return taken[0]

        user, decision, over = await self._admitted(api_key, client_ip, ip_per_minute, member, hold)
        if user is None or not decision.allowed:
            return Admission(user, decision)
        route = known if cached else await self._route(session_id)
        if route is None or route.owner != user.id:
            return Admission(user, decision)
        budget = user.tokens_per_day
        if budget is None:  # nothing to hold the turn against
            return Admission(user, decision, route)
        if not taken:  # the route was not cached: a round trip for the reservation alone
            tokens = route.max_tokens + input_tokens
            taken.append((Reservation(member, user.id, day, tokens, "redis"), budget))
            refused, _, used, reserved = await self._run([], member, taken[0])
            over = (used, reserved) if refused else None
        reservation = taken[0][0]
        if over is not None:
            refusal = over_budget(reservation.tokens, *over, budget)
            return Admission(user, decision, route, over_budget=refusal)
        return Admission(user, decision, route, reservation)

    def release(self, reservation: Reservation | None) -> None:
        if reservation is None:
            return
        # Not awaited: a lost release only holds budget until the reservation expires.
        task = asyncio.get_running_loop().create_task(self._zrem(reservation))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _zrem(self, reservation: Reservation) -> None:
        await self._redis.zrem(
            reserved_key(reservation.user_id, reservation.day), reservation_member(reservation)
        )

    async def flush(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)

    def forget_key(self, prefix: str) -> None:
        self._users.drop_where(lambda user: user is not None and user.key_prefix == prefix)

    def forget_user(self, user_id: str) -> None:
        self._users.drop_where(lambda user: user is not None and user.id == user_id)

    def forget_routes(self, session_id: str | None = None, agent_id: str | None = None) -> None:
        if session_id is not None:
            self._routes.drop(session_id)
        if agent_id is not None:
            self._routes.drop_where(lambda route: route.agent_id == agent_id)


def _request_id() -> str:
    """A window's member: 64 random bits (a window holds up to its limit of them)."""
    return uuid.uuid4().hex[:16]


def _digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()  # never keep plaintext keys


def _user_window(user: User) -> tuple[str, int]:
    return user_window(user.id), user.requests_per_minute


def _no_hold(user: User) -> None:
    return None
