"""The HTTP API with Redis: admission runs in the ingress (``RedisGate``), the limits and the
day's budgets in a real redis-server, and the replicas commit turns to the Redis session store.

The module swaps the session's app for a Redis-configured one (same control database, so the
users and keys carry over) and puts the default one back afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from starlette.testclient import TestClient

from actors import RuntimeConfig
from serve_app import APP_NAME, build, start_control_actor
from serve_app.admission import AUTH_CACHE_TTL_S, RedisGate
from serve_app.app import Api
from serve_app.backend import Control
from serve_app.control import ControlStore, today
from serve_app.errors import ApiError
from serve_app.ratelimit import user_window
from serve_app.redis_budget import used_key
from serve_app.replicas import Replicas
from serve_app.routes import build_app

from .api_client import (
    HELD_TURN,
    METERING_WAIT_S,
    Client,
    busy_sessions,
    check_rate_limit,
    new_session,
    new_user,
    release_held_turns,
    usage_row,
)
from .conftest import ApiServer, RedisServer
from .waiting import wait_until, wait_until_async

SWAP_TIMEOUT_S = 120.0
REVOKED_WAIT_S = 10.0
RELEASE_WAIT_S = 10.0
CLOCK_SLACK_S = 0.5


def _swap(api_server: ApiServer, redis_url: str | None) -> None:
    """Replaces the control actor and the app, with or without Redis."""
    from ray import serve

    ray.kill(ray.get_actor("control-store", namespace="hyperfleet"), no_restart=True)
    wait_until(_control_store_gone, "the control store's name to be freed", SWAP_TIMEOUT_S)
    control = start_control_actor(api_server.data_dir / "control.db", redis_url)
    ray.get(control.ping.remote(), timeout=SWAP_TIMEOUT_S)
    config = dict(api_server.config)
    if redis_url is not None:
        runtime = {**config["runtime"], "store_url": redis_url}
        config = {**config, "runtime": runtime, "redis_url": redis_url}
    serve.run(build(config, num_replicas=2), name=APP_NAME, route_prefix="/")


def _control_store_gone() -> bool:
    try:
        ray.get_actor("control-store", namespace="hyperfleet")
    except ValueError:
        return True
    return False


@pytest.fixture(scope="module")
def redis_api(api_server: ApiServer, redis_server: RedisServer) -> Iterator[ApiServer]:
    _swap(api_server, redis_server.url)
    try:
        yield api_server
    finally:
        _swap(api_server, None)


@pytest.fixture(scope="module")
def admin(redis_api: ApiServer) -> Iterator[Client]:
    client = Client(redis_api.base_url, redis_api.admin_key)
    yield client
    client.http.close()


def test_conversation_and_usage_mirror(
    admin: Client, redis_api: ApiServer, redis_server: RedisServer
) -> None:
    alice = new_user(admin, redis_api, tokens_per_day=10**9)  # so each turn takes a reservation
    agent = alice.ok("POST", "/v1/agents", 201, json={"tools": ["bash"]})
    try:
        sid = new_session(alice, agent["id"])
        turn = alice.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "hello"})
        streamed = alice.request(
            "POST", f"/v1/sessions/{sid}/messages", json={"content": "again", "stream": True}
        )
        assert streamed.status_code == 200 and "event: turn_end" in streamed.text
        assert alice.ok("GET", f"/v1/sessions/{sid}/messages")["version"] == 2
        used = sum(turn["usage"].values())
        assert used > 0
        # The control store mirrors the day's usage (both turns) into Redis for the budgets,
        # and ends each turn's reservation in the same step.
        redis = Redis.from_url(redis_server.url)
        key = used_key(alice.user_id, today())
        wait_until(
            lambda: int(redis.get(key) or 0) > used,
            "both turns' usage mirrored into Redis",
            METERING_WAIT_S,
        )
        rows = alice.ok("GET", "/v1/usage")["data"]
        total = sum(
            r[f]
            for r in rows
            for f in (
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            )
        )
        assert int(redis.get(key) or 0) == total
        reserved = f"hf:reserved:{alice.user_id}:{today()}"
        assert redis.zcard(reserved) == 0
        # The session's turns are in the Redis session store.
        assert redis.exists(f"hf:s:{sid}") == 1
    finally:
        alice.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_a_replica_meters_into_a_control_store_started_anew(
    admin: Client, redis_api: ApiServer, redis_server: RedisServer
) -> None:
    alice = new_user(admin, redis_api)
    agent = alice.ok("POST", "/v1/agents", 201, json={"tools": ["bash"]})
    try:
        sid = new_session(alice, agent["id"])
        alice.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "before"})
        usage_row(alice, agent["id"], turns=1)
        # A new control actor on the same database (as after `hyperfleet down` and `up`): the
        # replica, which outlives it, must find the new one by name and meter its next turn.
        _swap(redis_api, redis_server.url)
        alice.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "after"})
        usage_row(alice, agent["id"], turns=2)
    finally:
        alice.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_rate_limit_holds_across_two_ingress_replicas(admin: Client, redis_api: ApiServer) -> None:
    check_rate_limit(admin, redis_api)


def test_token_budget_and_concurrent_turns(
    admin: Client, redis_api: ApiServer, workspaces_root: Path
) -> None:
    capped = new_user(admin, redis_api, tokens_per_day=9_000)
    spec = {"max_tokens": 4000, "tools": ["bash"]}
    agent = capped.ok("POST", "/v1/agents", 201, json=spec)
    try:
        sessions = [new_session(capped, agent["id"]) for _ in range(4)]

        async def send_all() -> list[httpx.Response]:
            headers = {"Authorization": f"Bearer {capped.key}"}
            async with httpx.AsyncClient(
                base_url=redis_api.base_url, headers=headers, timeout=60
            ) as http:
                posts = [
                    asyncio.ensure_future(
                        http.post(f"/v1/sessions/{s}/messages", json={"content": HELD_TURN})
                    )
                    for s in sessions
                ]

                async def all_decided() -> bool:
                    # Refused (answered) or admitted (its turn running, held): every one of them.
                    answered = sum(1 for post in posts if post.done())
                    return answered + await busy_sessions(agent["id"]) == len(posts)

                try:
                    await wait_until_async(all_decided, "each turn refused or running")
                finally:
                    release_held_turns(workspaces_root, agent["id"], sessions)
                return list(await asyncio.gather(*posts))

        # Four concurrent turns reserving 4,000 each against 9,000 a day, none used yet. A
        # reservation ends when its turn commits, and the admitted turns are held running until
        # all four are decided: two fit (8,000 reserved), a third would make 12,000.
        responses = asyncio.run(send_all())
        ok = [r for r in responses if r.status_code == 200]
        over = [r for r in responses if r.status_code == 403]
        assert len(ok) == 2 and len(over) == 2, [r.text for r in responses]
        assert all(r.json()["error"]["type"] == "quota_exceeded" for r in over)
    finally:
        capped.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_revoked_key_stops_working(admin: Client, redis_api: ApiServer) -> None:
    bob = new_user(admin, redis_api)
    bob.ok("GET", "/v1/agents")
    prefix = bob.key.split("_")[1]  # type: ignore[union-attr]
    admin.ok("DELETE", f"/v1/keys/{prefix}")
    revoked_at = time.monotonic()
    # At once on the replica that revoked it, within the auth cache's TTL on the other one.
    wait_until(
        lambda: bob.request("GET", "/v1/agents").status_code == 401,
        "a replica to refuse the revoked key",
        REVOKED_WAIT_S,
    )
    # The claim is about a time, the cache's TTL: past it, no replica may still hold the key.
    time.sleep(max(0.0, revoked_at + AUTH_CACHE_TTL_S + CLOCK_SLACK_S - time.monotonic()))
    assert all(bob.request("GET", "/v1/agents").status_code == 401 for _ in range(6))


def test_unreachable_redis_is_503_not_500() -> None:
    from hyperfleet.processes import free_port

    gate = RedisGate(Control(), f"redis://127.0.0.1:{free_port()}/0")

    async def admit() -> None:
        await gate.admit("hf_x_y", "127.0.0.1", 100)

    with pytest.raises(ApiError) as raised:
        asyncio.run(admit())
    assert raised.value.status_code == 503 and raised.value.retry_after_s


class _CountingRedis(AsyncRedis):
    """A real client that counts the commands it sends (each one a round trip)."""

    sent = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        return await super().execute_command(*args, **options)


class _CountingControl(Control):
    """The real control-store client, recording which calls reach the control actor."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def _call(self, method: str, *args: Any) -> Any:
        self.calls.append(method)
        return await super()._call(method, *args)


def test_admission_is_one_round_trip_once_the_key_and_route_are_known(
    admin: Client, redis_api: ApiServer, redis_server: RedisServer
) -> None:
    # 5 a minute: the two requests below and three of the scenario's four.
    user = new_user(admin, redis_api, tokens_per_day=9_000, requests_per_minute=5)
    agent = user.ok("POST", "/v1/agents", 201, json={"max_tokens": 4000})
    try:
        sid = new_session(user, agent["id"])
        # A second key, from the admin: it shares the user's window with the first key.
        user_id = user.user_id
        key = admin.ok("POST", f"/v1/users/{user_id}/keys", 201)["api_key"]
        redis = Redis.from_url(redis_server.url)
        client = _CountingRedis.from_url(redis_server.url)
        control = _CountingControl()
        # The auth cache outlives the scenario, however slow the control actor is today.
        gate = RedisGate(control, redis_server.url, client=client, auth_cache_ttl_s=600)
        ip = "198.51.100.7"  # a documentation address: only a window's name here
        reserved_set = f"hf:reserved:{user_id}:{today()}"

        async def scenario() -> dict[str, Any]:
            first = await gate.begin_message(key, ip, 100, sid)  # learns the key and the route
            learned = list(control.calls)
            sent_before = client.sent
            second = await gate.begin_message(key, ip, 100, sid)
            sent, calls = client.sent - sent_before, control.calls[len(learned) :]
            assert second.decision.allowed and second.decision.remaining == 1
            # Windows pass (5 of 5), the budget does not: 8,000 held of 9,000.
            third = await gate.begin_message(key, ip, 100, sid)
            assert third.over_budget is not None and third.reservation is None
            fourth = await gate.begin_message(key, ip, 100, sid)
            held = redis.zcard(reserved_set)
            gate.release(first.reservation)
            gate.release(second.reservation)
            await wait_until_async(
                lambda: redis.zcard(reserved_set) == 0,
                "the released reservations to leave Redis",
                RELEASE_WAIT_S,
            )
            return {
                "learned": learned,
                "sent": sent,
                "calls": calls,
                "fourth": fourth,
                "held": held,
            }

        seen = asyncio.run(scenario())
        assert seen["learned"] == ["authenticate", "get_route"]
        assert seen["sent"] == 1 and seen["calls"] == []  # one round trip, no control call
        decision = seen["fourth"].decision
        assert not decision.allowed and decision.limit == 5 and decision.remaining == 0
        assert 1 <= decision.reset_s <= 60
        assert seen["held"] == 2 and redis.zcard(reserved_set) == 0
        # A request a window refused is not counted in it: 5 in the user's (both keys'), 4 in
        # the IP's.
        assert redis.zcard(user_window(user_id)) == 5
        assert redis.zcard(f"hf:rl:ip:{ip}") == 4
    finally:
        # The user's minute is spent: empty its window so that the cleanup is admitted.
        with Redis.from_url(redis_server.url) as windows:
            windows.delete(user_window(user.user_id))
        user.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_an_ip_over_its_limit_is_refused_before_its_keys_are_looked_up(
    redis_api: ApiServer, redis_server: RedisServer
) -> None:
    control = _CountingControl()
    gate = RedisGate(control, redis_server.url)
    ip = "198.51.100.8"

    async def scenario() -> list[Any]:
        return [await gate.admit(f"hf_guess{n}_secret", ip, 1) for n in range(3)]

    admitted = asyncio.run(scenario())
    first, second, third = (a.decision for a in admitted)
    assert admitted[0].user is None and first.allowed  # a 401: the key was looked up, unknown
    assert not second.allowed and not third.allowed and second.remaining == 0
    assert 1 <= second.reset_s <= 60
    assert control.calls == ["authenticate"]  # the refused guesses never reached the store


def test_a_lowered_limit_tells_when_the_window_has_room_again(
    redis_api: ApiServer, redis_server: RedisServer
) -> None:
    redis = Redis.from_url(redis_server.url)
    window = "hf:rl:ip:198.51.100.9"
    seconds, micros = redis.time()
    now_ms = seconds * 1000 + micros // 1000
    # Five requests 50, 40, 30, 20 and 10 s ago, admitted under a limit since lowered to 2.
    redis.zadd(window, {f"r{age}": now_ms - age * 1000 for age in (50, 40, 30, 20, 10)})
    gate = RedisGate(Control(), redis_server.url)
    decision = asyncio.run(gate.admit(None, "198.51.100.9", 2)).decision
    # Room for one more once four have left the window: the one from 20 s ago, in 40 s.
    assert not decision.allowed and 39 <= decision.reset_s <= 41


def test_a_deleted_agents_session_is_404_on_every_ingress_replica(
    admin: Client, redis_api: ApiServer
) -> None:
    user = new_user(admin, redis_api)
    agent = user.ok("POST", "/v1/agents", 201, json={})
    sid = new_session(user, agent["id"])
    path = f"/v1/sessions/{sid}/messages"
    for _ in range(6):  # both ingress replicas answer some, and cache the session's route
        user.ok("POST", path, json={"content": "hello"})
    user.ok("DELETE", f"/v1/agents/{agent['id']}")
    statuses = [user.request("POST", path, json={"content": "hi"}).status_code for _ in range(10)]
    # The replica that deleted it forgot the route; the other finds the replica gone once (a
    # 503 to retry) and reads the route again: 404 from then on, not 503 until the cache expires.
    assert statuses.count(503) <= 1 and statuses.count(404) + statuses.count(503) == 10, statuses
    assert statuses[-1] == 404


class _StoreCalls:
    """``Control`` without Ray: each call is the control store's own method, awaited."""

    def __init__(self, store: ControlStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        async def call(*args: Any) -> Any:
            return method(*args)

        return call

    def release_soon(self, reservation: Any) -> None:
        self._store.release(reservation)


def test_a_lowered_quota_applies_at_once_on_the_ingress_that_lowered_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # One ingress replica in this process, so every request below is answered by the one
    # that lowered the quota (the other replicas take up to AUTH_CACHE_TTL_S).
    store = ControlStore(tmp_path / "control.db")
    control: Any = _StoreCalls(store)
    api = Api(control, Replicas(RuntimeConfig()), RedisGate(control, redis_server.url), 10**6)
    store.create_user("usr_admin", "admin", {}, True)
    admin = {"Authorization": "Bearer " + store.issue_key("usr_admin").api_key}
    user_id = "usr_" + uuid.uuid4().hex[:12]
    store.create_user(user_id, "u", {"requests_per_minute": 100})
    user = {"Authorization": "Bearer " + store.issue_key(user_id).api_key}
    with TestClient(build_app(api)) as client:
        assert [client.get("/v1/usage", headers=user).status_code for _ in range(3)] == [200] * 3
        patched = client.patch(
            f"/v1/users/{user_id}", json={"quotas": {"requests_per_minute": 3}}, headers=admin
        )
        assert patched.status_code == 200 and patched.json()["quotas"]["requests_per_minute"] == 3
        # The fourth request of a minute whose limit is now 3 (before: the cached user's 100).
        refused = client.get("/v1/usage", headers=user)
    assert refused.status_code == 429 and refused.headers["ratelimit-limit"] == "3"
    store.close()
