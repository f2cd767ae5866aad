"""One admission contract, two gates: every sequence here runs on ``ControlGate`` and on
``RedisGate`` and expects the same decisions, headers, reservations and refusals.

Both gates stand on the real control store (``ControlStore`` on a SQLite file, mirroring metered
usage into Redis as the control-store actor does) and ``RedisGate`` on a real redis-server on
loopback. The control store is called in-process, as its actor would call it (``InProcessControl``
below is the actor's typed delegation without the Ray hop), so that one fake clock times both
gates: the control store's windows and reservations, the Redis script's (``RedisGate(clock=...)``
passes the time in place of Redis's ``TIME``), and the day a budget counts in. Nothing sleeps.

Each test uses its own users and client address, so the Redis server is shared safely.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis as AsyncRedis

from hyperfleet.metering import RESERVATION_TTL_S, Reservation, UsageRecord, utc_day
from serve_app.admission import ControlGate, Gate, RedisGate
from serve_app.control import ControlStore
from serve_app.ratelimit import Decision
from serve_app.records import Admission, Route, User
from serve_app.redis_budget import RedisUsageMirror

from .conftest import RedisServer

# 2030-01-15 00:01:00 UTC: an hour and more of the same UTC day ahead, for the budget sequences.
START_S = 1_894_665_660.0
DAY_S = 86_400.0
MANY = 1_000_000  # a limit that no sequence here reaches


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class InProcessControl:
    """The control store as ``serve_app.backend.Control`` serves it to the gates, minus Ray: the
    same store methods, called in this process (a release takes effect at once, as the actor's
    next call from the same ingress would see it)."""

    def __init__(self, store: ControlStore) -> None:
        self._store = store

    async def authenticate(self, api_key: str) -> User | None:
        return self._store.authenticate(api_key)

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int | None
    ) -> Admission:
        return self._store.admit(api_key, client_ip, ip_per_minute)

    async def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission:
        return self._store.begin_message(
            api_key, client_ip, ip_per_minute, session_id, input_tokens
        )

    async def get_route(self, session_id: str) -> Route | None:
        return self._store.get_route(session_id)

    def release_soon(self, reservation: Reservation) -> None:
        self._store.release(reservation)


@dataclass
class Caller:
    user: User
    key: str

    @property
    def prefix(self) -> str:
        return self.key.split("_")[1]


@dataclass
class Admissions:
    """One gate over the real control store, and what a sequence needs to drive it."""

    gate: Gate
    store: ControlStore
    clock: Clock
    ip: str

    def caller(self, **quotas: Any) -> Caller:
        user_id = "usr_" + uuid.uuid4().hex[:12]
        self.store.create_user(user_id, "u", quotas)
        user = self.store.get_user(user_id)
        assert user is not None
        return Caller(user, self.store.issue_key(user_id).api_key)

    def key(self, caller: Caller) -> str:
        """Another key of the caller's."""
        return self.store.issue_key(caller.user.id).api_key

    def session(self, caller: Caller, max_tokens: int) -> str:
        """A session of a new agent of the caller's, whose turns reserve ``max_tokens``."""
        agent_id = "agt_" + uuid.uuid4().hex[:12]
        spec = json.dumps({"max_tokens": max_tokens})
        self.store.create_agent(agent_id, caller.user.id, spec, 1, MANY)
        session_id = "ses_" + uuid.uuid4().hex
        self.store.add_route(session_id, agent_id, caller.user.id, 0)
        return session_id

    async def admit(self, key: str | None, ip_per_minute: int | None = MANY) -> Admission:
        return await self.gate.admit(key, self.ip, ip_per_minute)

    async def turn(self, caller: Caller, session_id: str, key: str | None = None) -> Admission:
        return await self.gate.begin_message(key or caller.key, self.ip, MANY, session_id)

    def meter(self, caller: Caller, tokens: int, reservation: Reservation | None) -> None:
        """A replica commits a turn that used ``tokens`` and meters it (``actors.meter``)."""
        usage = {"input_tokens": tokens - tokens // 5, "output_tokens": tokens // 5}
        record = UsageRecord(
            "turn_" + uuid.uuid4().hex, caller.user.id, "agt_x", usage, 0.01, reservation
        )
        assert self.store.record_usages([record]) == 1


GATES = ["control", "redis"]


@pytest.fixture(params=GATES)
async def admissions(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Admissions]:
    clock = Clock(START_S)
    store = ControlStore(tmp_path / "control.db", RedisUsageMirror(redis_server.url), clock)
    control = InProcessControl(store)
    client = AsyncRedis.from_url(redis_server.url)
    gate: Gate = (
        ControlGate(control)
        if request.param == "control"
        else RedisGate(control, redis_server.url, client=client, clock=clock)
    )
    try:
        yield Admissions(gate, store, clock, "ip-" + uuid.uuid4().hex)
    finally:
        await client.aclose()
        store.close()


def _decisions(admitted: list[Admission]) -> list[Decision]:
    return [a.decision for a in admitted]


# Rate windows -----------------------------------------------------------------------------------


async def test_the_address_window_admits_its_limit_per_minute(admissions: Admissions) -> None:
    seen = []
    for _ in range(4):  # at 0, 10, 20 and 30 s, no key: the address's window alone
        seen.append(await admissions.admit(None, ip_per_minute=3))
        admissions.clock.advance(10)
    assert _decisions(seen) == [
        Decision(True, 3, 2, 60),
        Decision(True, 3, 1, 50),
        Decision(True, 3, 0, 40),
        Decision(False, 3, 0, 30),  # room again when the first request leaves, at 60 s
    ]
    assert all(a.user is None for a in seen)
    assert seen[3].decision.headers() == {
        "ratelimit-limit": "3",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "30",
        "Retry-After": "30",
    }
    admissions.clock.advance(19)  # 59 s: the refused request was not recorded
    assert (await admissions.admit(None, ip_per_minute=3)).decision == Decision(False, 3, 0, 1)
    admissions.clock.advance(1)  # 60 s: the first request has left
    assert (await admissions.admit(None, ip_per_minute=3)).decision == Decision(True, 3, 0, 10)


async def test_unknown_keys_count_in_the_address_window(admissions: Admissions) -> None:
    guesses = ["hf_000000000000_" + "x" * 32, "not-a-key", "hf_000000000000_" + "y" * 32]
    seen = [await admissions.admit(key, ip_per_minute=2) for key in guesses]
    assert [a.user for a in seen] == [None, None, None]
    assert _decisions(seen) == [
        Decision(True, 2, 1, 60),
        Decision(True, 2, 0, 60),
        Decision(False, 2, 0, 60),
    ]


async def test_the_key_window_comes_after_the_address_window(admissions: Admissions) -> None:
    caller = admissions.caller(requests_per_minute=2)
    seen = []
    for _ in range(4):  # at 0, 1, 2 and 3 s, under an address limit of 3
        seen.append(await admissions.admit(caller.key, ip_per_minute=3))
        admissions.clock.advance(1)
    assert _decisions(seen) == [
        Decision(True, 2, 1, 60),  # the key's window decides (and gives the headers)
        Decision(True, 2, 0, 59),
        Decision(False, 2, 0, 58),  # the key's window refuses: recorded in the address's...
        Decision(False, 3, 0, 57),  # ...which is full now
    ]
    assert seen[0].user == seen[1].user and seen[0].user is not None
    assert seen[0].user.id == caller.user.id and seen[0].user.key_prefix == caller.prefix
    assert seen[3].user is None  # refused before its key was looked at


async def test_a_users_keys_share_one_window(admissions: Admissions) -> None:
    caller = admissions.caller(requests_per_minute=3)
    other_key = admissions.key(caller)
    stranger = admissions.caller(requests_per_minute=3)
    seen = []
    for key in (caller.key, other_key, caller.key, other_key):  # at 0, 10, 20 and 30 s
        seen.append(await admissions.admit(key))
        admissions.clock.advance(10)
    # One window of 3 for both keys, and its headers, whichever key a request carries.
    assert _decisions(seen) == [
        Decision(True, 3, 2, 60),
        Decision(True, 3, 1, 50),
        Decision(True, 3, 0, 40),
        Decision(False, 3, 0, 30),
    ]
    assert seen[1].user is not None and seen[1].user.id == caller.user.id
    assert seen[1].user.key_prefix == other_key.split("_")[1]
    assert seen[3].decision.headers() == {
        "ratelimit-limit": "3",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "30",
        "Retry-After": "30",
    }
    # A third key minted now (40 s) gets no more: the user's window is still full.
    assert (await admissions.admit(admissions.key(caller))).decision == Decision(False, 3, 0, 20)
    # Another user's window is its own.
    assert (await admissions.admit(stranger.key)).decision == Decision(True, 3, 2, 60)
    admissions.clock.advance(20)  # 60 s: the first request has left, whichever key made it
    assert (await admissions.admit(other_key)).decision == Decision(True, 3, 0, 10)


async def test_an_exempt_address_skips_its_window_but_not_the_users(
    admissions: Admissions,
) -> None:
    """``ip_per_minute`` None: an address the operator exempted (``ip_exempt``)."""
    keyless = [await admissions.admit(None, ip_per_minute=None) for _ in range(5)]
    assert [(a.decision.allowed, a.user) for a in keyless] == [(True, None)] * 5
    caller = admissions.caller(requests_per_minute=2)
    seen = [await admissions.admit(caller.key, ip_per_minute=None) for _ in range(3)]
    assert _decisions(seen) == [
        Decision(True, 2, 1, 60),
        Decision(True, 2, 0, 60),
        Decision(False, 2, 0, 60),
    ]
    # The address's own window was not touched: a limit of 1 still has room.
    assert (await admissions.admit(None, ip_per_minute=1)).decision == Decision(True, 1, 0, 60)


async def test_a_lowered_limit_waits_until_enough_requests_left(admissions: Admissions) -> None:
    for _ in range(5):  # at 0, 10, 20, 30 and 40 s, under a limit of 5
        assert (await admissions.admit(None, ip_per_minute=5)).decision.allowed
        admissions.clock.advance(10)
    # At 50 s under a limit of 2: room for one more once four have left (the one from 30 s
    # ago, in 40 s), not when the oldest leaves (in 10 s).
    refused = await admissions.admit(None, ip_per_minute=2)
    assert refused.decision == Decision(False, 2, 0, 40)


# Token budgets ----------------------------------------------------------------------------------


async def test_reservations_hold_the_daily_budget_until_released_or_metered(
    admissions: Admissions,
) -> None:
    caller = admissions.caller(tokens_per_day=9_000)
    session_id = admissions.session(caller, max_tokens=4_000)
    day = utc_day(START_S)

    first = await admissions.turn(caller, session_id)  # the route is not cached yet
    second = await admissions.turn(caller, session_id)
    for admitted in (first, second):
        assert admitted.decision.allowed and admitted.over_budget is None
        assert admitted.route is not None and admitted.route.id == session_id
        assert admitted.route.max_tokens == 4_000
        assert admitted.reservation is not None
        assert (admitted.reservation.user_id, admitted.reservation.day) == (caller.user.id, day)
        assert admitted.reservation.tokens == 4_000
    third = await admissions.turn(caller, session_id)
    assert third.reservation is None and third.route is not None
    assert third.over_budget == (
        "this turn may use 4000 tokens; 0 used and 8000 reserved today of your 9000 tokens per day"
    )

    admissions.gate.release(first.reservation)  # the first turn failed
    await admissions.gate.flush()
    fourth = await admissions.turn(caller, session_id)
    assert fourth.reservation is not None

    # The second turn commits, using 3,000 tokens: its reservation ends as its usage counts.
    admissions.meter(caller, 3_000, second.reservation)
    fifth = await admissions.turn(caller, session_id)
    assert fifth.over_budget == (
        "this turn may use 4000 tokens; 3000 used and 4000 reserved today of your 9000 tokens "
        "per day"
    )


async def test_a_charge_retakes_the_reservation_where_the_gate_holds_it(
    admissions: Admissions,
) -> None:
    """Before a turn's further model call the replica charges its calls so far and re-takes
    the reservation for the next one (``ControlStore.charge``): the gate's next admissions see
    the new hold, and a charge the budget refuses ends it."""
    caller = admissions.caller(tokens_per_day=1_000)
    session_id = admissions.session(caller, max_tokens=100)
    held = (await admissions.turn(caller, session_id)).reservation
    assert held is not None
    usage = {"input_tokens": 300}
    charge = admissions.store.charge(
        UsageRecord("turn_a:1", caller.user.id, "agt_x", usage, 0.01, None, 0), held, 550
    )
    assert charge.refusal is None and charge.reservation is not None
    assert charge.reservation.tokens == 550
    assert (await admissions.turn(caller, session_id)).reservation is not None  # 300+550+100
    third = await admissions.turn(caller, session_id)
    assert third.over_budget == (
        "this turn may use 100 tokens; 300 used and 650 reserved today of your 1000 tokens per day"
    )
    refused = admissions.store.charge(
        UsageRecord("turn_a:2", caller.user.id, "agt_x", {"input_tokens": 100}, 0.01, None, 0),
        charge.reservation,
        600,
    )
    assert refused.reservation is None
    assert refused.refusal == (
        "this turn may use 600 tokens; 400 used and 100 reserved today of your 1000 tokens per day"
    )
    # The refused charge ended the 550-token hold: 400 used + 100 + 100 fits.
    assert (await admissions.turn(caller, session_id)).reservation is not None


async def test_a_turn_reserves_its_messages_estimate_too(admissions: Admissions) -> None:
    caller = admissions.caller(tokens_per_day=1_000)
    session_id = admissions.session(caller, max_tokens=100)
    gate, ip = admissions.gate, admissions.ip
    held = (await gate.begin_message(caller.key, ip, MANY, session_id, 600)).reservation
    assert held is not None and held.tokens == 700
    over = await gate.begin_message(caller.key, ip, MANY, session_id, 201)
    assert over.reservation is None and over.over_budget == (
        "this turn may use 301 tokens; 0 used and 700 reserved today of your 1000 tokens per day"
    )


async def test_a_reservation_nobody_ends_expires(admissions: Admissions) -> None:
    caller = admissions.caller(tokens_per_day=4_000)
    session_id = admissions.session(caller, max_tokens=4_000)
    assert (await admissions.turn(caller, session_id)).reservation is not None
    admissions.clock.advance(RESERVATION_TTL_S - 1)
    assert (await admissions.turn(caller, session_id)).over_budget is not None
    admissions.clock.advance(1)
    assert (await admissions.turn(caller, session_id)).reservation is not None


async def test_each_utc_day_has_its_own_budget(admissions: Admissions) -> None:
    caller = admissions.caller(tokens_per_day=4_000)
    session_id = admissions.session(caller, max_tokens=2_000)
    held = (await admissions.turn(caller, session_id)).reservation
    admissions.meter(caller, 3_000, held)
    assert (await admissions.turn(caller, session_id)).over_budget is not None
    admissions.clock.advance(DAY_S)
    tomorrow = await admissions.turn(caller, session_id)
    assert tomorrow.reservation is not None and tomorrow.reservation.day == utc_day(START_S + DAY_S)
    assert (await admissions.turn(caller, session_id)).reservation is not None
    assert (await admissions.turn(caller, session_id)).over_budget == (
        "this turn may use 2000 tokens; 0 used and 4000 reserved today of your 4000 tokens per day"
    )


async def test_a_user_without_a_budget_reserves_nothing(admissions: Admissions) -> None:
    caller = admissions.caller()
    session_id = admissions.session(caller, max_tokens=4_000)
    for _ in range(2):  # uncached route, then cached
        admitted = await admissions.turn(caller, session_id)
        assert admitted.route is not None and admitted.route.id == session_id
        assert admitted.reservation is None and admitted.over_budget is None


async def test_only_the_callers_own_session_reserves(admissions: Admissions) -> None:
    owner = admissions.caller(tokens_per_day=4_000)
    intruder = admissions.caller(tokens_per_day=4_000)
    session_id = admissions.session(owner, max_tokens=4_000)
    held = await admissions.turn(owner, session_id)  # (RedisGate caches the route now)
    assert held.reservation is not None
    other = await admissions.turn(intruder, session_id)
    assert other.decision.allowed and other.user is not None
    assert other.route is None and other.reservation is None  # a 404
    unknown = await admissions.turn(intruder, "ses_" + uuid.uuid4().hex)
    assert unknown.route is None and unknown.reservation is None
    # Neither took anything from anyone's budget.
    intruders_own = await admissions.turn(intruder, admissions.session(intruder, 4_000))
    assert intruders_own.reservation is not None
    admissions.gate.release(held.reservation)
    await admissions.gate.flush()
    assert (await admissions.turn(owner, session_id)).reservation is not None


async def test_a_refused_request_reserves_nothing(admissions: Admissions) -> None:
    caller = admissions.caller(requests_per_minute=2, tokens_per_day=4_000)
    session_id = admissions.session(caller, max_tokens=4_000)
    taken = await admissions.turn(caller, session_id)
    assert taken.decision == Decision(True, 2, 1, 60) and taken.reservation is not None
    over = await admissions.turn(caller, session_id)
    # Over budget, and still counted in the windows.
    assert over.decision == Decision(True, 2, 0, 60) and over.over_budget is not None
    limited = await admissions.turn(caller, session_id)
    assert limited.decision == Decision(False, 2, 0, 60)
    assert limited.reservation is None and limited.over_budget is None
    admissions.gate.release(taken.reservation)
    await admissions.gate.flush()
    admissions.clock.advance(60)
    # The budget is whole again: neither refused request held any of it.
    assert (await admissions.turn(caller, session_id)).reservation is not None


# Keys -------------------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused(admissions: Admissions) -> None:
    caller = admissions.caller()
    other_key = admissions.key(caller)
    stranger = admissions.caller()
    assert (await admissions.admit(caller.key)).user is not None
    assert (await admissions.admit(other_key)).user is not None
    # Only the key's own user (or an admin) revokes it.
    assert not admissions.store.revoke_key(caller.prefix, stranger.user.id)
    assert (await admissions.admit(caller.key)).user is not None
    assert admissions.store.revoke_key(caller.prefix, caller.user.id)
    admissions.gate.forget_key(caller.prefix)  # what the ingress that revoked it does
    revoked = await admissions.admit(caller.key)
    assert revoked.user is None and revoked.decision.allowed  # a 401, not a 429
    assert (await admissions.admit(other_key)).user is not None  # the user's other key works
    session_id = admissions.session(caller, max_tokens=1)
    assert (await admissions.turn(caller, session_id)).user is None
