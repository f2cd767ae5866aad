"""Token budgets over real HTTP: the turn's replica owns its reservation from the call on, every
model call is metered once, and usage a dead replica left in the session store's outbox is
metered by a sweep. Real Serve, replicas, control store and session store, and the emulator."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from actors import NAMESPACE, replica_name
from actors.store.actor import STORE_ACTOR_NAME
from hyperfleet.metering import UsageRecord

from .api_client import (
    HELD_TURN,
    TIMEOUT_S,
    Client,
    busy_sessions,
    new_session,
    new_user,
    release_held_turns,
    usage_row,
)
from .conftest import ApiServer
from .waiting import wait_until, wait_until_async

LOOP_FILE = '[[tool read_file {"path": "loop.txt"}]]'


@pytest.fixture(scope="module")
def admin(api_server: ApiServer) -> Iterator[Client]:
    client = Client(api_server.base_url, api_server.admin_key)
    yield client
    client.http.close()


def _tokens(row: dict[str, Any]) -> int:
    fields = ("input_tokens", "output_tokens", "cache_read_input_tokens")
    return sum(int(row[f]) for f in (*fields, "cache_creation_input_tokens"))


def _used(client: Client) -> int:
    return sum(_tokens(row) for row in client.ok("GET", "/v1/usage")["data"])


def test_a_client_that_hangs_up_keeps_its_turns_reservation(
    admin: Client, api_server: ApiServer, workspaces_root: Path
) -> None:
    """A non-streaming client that goes away does not end the reservation while its turn runs:
    the budget still counts it, and it ends with the turn's usage."""
    user = new_user(admin, api_server, tokens_per_day=6_000)
    agent = user.ok("POST", "/v1/agents", 201, json={"tools": ["bash"], "max_tokens": 4_000})
    held, other = new_session(user, agent["id"]), new_session(user, agent["id"])

    async def hang_up_mid_turn() -> None:
        async with httpx.AsyncClient(base_url=api_server.base_url, timeout=TIMEOUT_S) as http:
            headers = {"Authorization": f"Bearer {user.key}"}
            request = http.post(
                f"/v1/sessions/{held}/messages", json={"content": HELD_TURN}, headers=headers
            )
            task = asyncio.ensure_future(request)

            async def running() -> bool:
                return await busy_sessions(agent["id"]) == 1

            await wait_until_async(running, "the held turn to be running")
            task.cancel()  # the client hangs up; the turn runs on

    try:
        asyncio.run(hang_up_mid_turn())
        # 4,000 held by the running turn + 4,000 for this one > 6,000 tokens per day.
        over = user.request("POST", f"/v1/sessions/{other}/messages", json={"content": "more"})
        assert over.status_code == 403, over.text
        assert "tokens per day" in over.json()["error"]["message"]
    finally:
        release_held_turns(workspaces_root, agent["id"], [held])
    usage_row(user, agent["id"], turns=1)  # the turn finished, metered; its hold ended
    wait_until(
        lambda: (
            user.request(
                "POST", f"/v1/sessions/{other}/messages", json={"content": "fits now"}
            ).status_code
            == 200
        ),
        "the budget to fit a turn again",
        TIMEOUT_S,
    )
    user.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_a_streamed_turn_that_times_out_after_answering_is_metered(
    admin: Client, api_server: ApiServer
) -> None:
    """The audit's reproduction: the answer reached the client, then a tool outlived the turn's
    limit. Before, ``/v1/usage`` stayed at 0."""
    user = new_user(admin, api_server, tokens_per_day=100_000)
    spec = {"tools": ["bash"], "turn_timeout_s": 2, "tool_timeout_s": 60}
    agent = user.ok("POST", "/v1/agents", 201, json=spec)
    sid = new_session(user, agent["id"])

    def client_ready() -> bool:
        # The 2 s limit must not also time the replica's model client start (a second or two).
        replica = ray.get_actor(replica_name(agent["id"], 0), namespace=NAMESPACE)
        return bool(ray.get(replica.stats.remote(), timeout=TIMEOUT_S)["model_client"] == "ready")

    wait_until(client_ready, "the replica's model client", TIMEOUT_S)
    user.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "hello"})
    first = usage_row(user, agent["id"], turns=1)
    response = user.request(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"content": '[[tool bash {"command": "sleep 30"}]]', "stream": True},
    )
    assert "event: tool_use" in response.text and "past its 2 s limit" in response.text
    assert "event: turn_end" not in response.text
    row = usage_row(user, agent["id"], turns=2)
    assert row["output_tokens"] > first["output_tokens"] and _tokens(row) > _tokens(first)
    user.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_a_large_message_is_reserved_for_its_size(admin: Client, api_server: ApiServer) -> None:
    """The audit's reproduction: an agent with ``max_tokens: 1`` reserved 1 token a turn, so
    fifty large messages at once were all admitted against a budget of 10,000. Admission now
    holds the message's estimated input too."""
    user = new_user(admin, api_server, tokens_per_day=10_000)
    agent = user.ok("POST", "/v1/agents", 201, json={"max_tokens": 1})
    sid = new_session(user, agent["id"])
    large = "word " * 12_000  # 60,000 characters: some 15,000 tokens, estimated 20,000
    refused = user.request("POST", f"/v1/sessions/{sid}/messages", json={"content": large})
    assert refused.status_code == 403, refused.text
    assert "this turn may use 20001 tokens" in refused.json()["error"]["message"]
    user.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "word " * 1_000})
    assert 0 < _tokens(usage_row(user, agent["id"], turns=1)) < 10_000
    user.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_tool_loops_stop_at_the_daily_budget(admin: Client, api_server: ApiServer) -> None:
    """The audit's reproduction: turns whose tool loops make many calls each. Before, each turn
    reserved ``max_tokens`` and the day ended thousands of times over its budget; now the day
    ends over it by at most one call (one turn runs at a time here)."""
    budget = 10_000
    user = new_user(admin, api_server, tokens_per_day=budget)
    spec = {"tools": ["bash", "read_file"], "max_tokens": 64, "max_turns": 50}
    agent = user.ok("POST", "/v1/agents", 201, json=spec)
    sid = new_session(user, agent["id"])
    command = f"printf '%s' '{LOOP_FILE}' > loop.txt"
    user.ok(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"content": "[[tool bash " + json.dumps({"command": command}) + "]]"},
    )
    statuses = []
    for _ in range(20):
        response = user.request("POST", f"/v1/sessions/{sid}/messages", json={"content": LOOP_FILE})
        statuses.append(response.status_code)
        if response.status_code == 403 and "during the turn" not in response.text:
            break  # admission refuses: the day is spent
    assert statuses[-1] == 403, statuses
    time.sleep(0.5)  # metering lingers 50 ms
    used = _used(user)
    # One call of this conversation is a few hundred tokens, its biggest under 2,000; a turn
    # of 50 calls would be tens of thousands.
    assert budget // 2 < used < budget + 2_000, (used, statuses)
    user.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_usage_a_dead_replica_left_in_the_outbox_is_metered_by_a_sweep(
    admin: Client, api_server: ApiServer
) -> None:
    """A replica that commits a turn and dies before its meter sends the record leaves it in
    the session store's outbox (written with the commit); any replica's sweep meters it, once."""
    user = new_user(admin, api_server, tokens_per_day=100_000)
    agent = user.ok("POST", "/v1/agents", 201, json={})
    sid = new_session(user, agent["id"])
    user.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "hello"})
    before = usage_row(user, agent["id"], turns=1)
    orphan = UsageRecord(
        f"turn_{uuid.uuid4().hex}:end",
        user.user_id,
        agent["id"],
        {"input_tokens": 1_234, "output_tokens": 56},
        0.5,
    )
    store = ray.get_actor(STORE_ACTOR_NAME, namespace=NAMESPACE)
    ray.get(store.record_usage.remote(orphan), timeout=TIMEOUT_S)
    ray.get(store.record_usage.remote(orphan), timeout=TIMEOUT_S)  # written twice: one record
    after = usage_row(user, agent["id"], turns=2)  # swept within grace + interval (3 s here)
    assert after["input_tokens"] == before["input_tokens"] + 1_234
    assert after["output_tokens"] == before["output_tokens"] + 56

    def outbox_empty() -> bool:
        left = ray.get(store.unmetered_usage.remote(time.time() + 1, 1_000), timeout=TIMEOUT_S)
        return not any(r.id == orphan.id for r in left)

    wait_until(outbox_empty, "the swept record to leave the outbox", TIMEOUT_S)
    time.sleep(2.5)  # another sweep's worth: it is not metered again
    assert usage_row(user, agent["id"], turns=2)["input_tokens"] == after["input_tokens"]
    user.ok("DELETE", f"/v1/agents/{agent['id']}")
