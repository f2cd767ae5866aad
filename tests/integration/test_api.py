"""The HTTP API over real HTTP against real Serve (two ingress replicas), real replicas, the
emulator and the stores."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from .api_client import (
    HELD_TURN,
    TIMEOUT_S,
    Client,
    busy_sessions,
    check_rate_limit,
    new_session,
    new_user,
    release_held_turns,
    usage_row,
)
from .conftest import ApiServer
from .waiting import wait_until_async


@pytest.fixture(scope="module")
def admin(api_server: ApiServer) -> Iterator[Client]:
    client = Client(api_server.base_url, api_server.admin_key)
    yield client
    client.http.close()


@pytest.fixture(scope="module")
def alice(admin: Client, api_server: ApiServer) -> Client:
    # Not the default 100 a minute: this module's tests make more than that, as fast as replicas
    # start. Rate limits have their own user (test_rate_limit_holds_across_two_ingress_replicas).
    return new_user(admin, api_server, requests_per_minute=2_000)


@pytest.fixture(scope="module")
def agent(alice: Client) -> Iterator[dict[str, Any]]:
    spec = {"tools": ["bash", "read_file"], "system": "You are an API test agent."}
    created = alice.ok("POST", "/v1/agents", 201, json=spec)
    assert created["status"] == "ready"
    yield dict(created)
    alice.ok("DELETE", f"/v1/agents/{created['id']}")


def _events(response: httpx.Response) -> list[tuple[str, int, dict[str, Any]]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], int(fields["id"]), json.loads(fields["data"])))
    return events


def test_health_ready_openapi(api_server: ApiServer) -> None:
    http = httpx.Client(base_url=api_server.base_url, timeout=TIMEOUT_S)
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    doc = http.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    assert "post" in doc["paths"]["/v1/sessions/{session_id}/messages"]
    assert "AgentSpec" in doc["components"]["schemas"]


def test_users_and_keys(admin: Client, api_server: ApiServer) -> None:
    bob = new_user(admin, api_server, requests_per_minute=500)
    me = bob.ok("GET", f"/v1/users/{bob.user_id}")
    assert me["quotas"] == {
        "max_agents": 50,
        "requests_per_minute": 500,
        "tokens_per_day": None,
        "max_replicas": 50,
        "max_cores": 50.0,
        "max_sessions": 1000,
        "max_keys": 10,
    }
    assert bob.request("POST", "/v1/users", json={"name": "x"}).status_code == 403
    carol = new_user(admin, api_server)
    assert bob.request("GET", f"/v1/users/{carol.user_id}").status_code == 404
    patched = admin.ok(
        "PATCH",
        f"/v1/users/{bob.user_id}",
        json={"quotas": {"max_agents": 3}},
    )
    assert patched["quotas"]["max_agents"] == 3 and patched["quotas"]["requests_per_minute"] == 500
    second = bob.ok("POST", f"/v1/users/{bob.user_id}/keys", 201)
    other = Client(api_server.base_url, second["api_key"])
    assert other.ok("GET", "/v1/agents")["data"] == []
    assert carol.request("DELETE", f"/v1/keys/{second['prefix']}").status_code == 404
    bob.ok("DELETE", f"/v1/keys/{second['prefix']}")
    revoked = other.request("GET", "/v1/agents")
    assert revoked.status_code == 401
    assert revoked.json() == {"error": {"type": "unauthorized", "message": "invalid API key"}}


def test_agents(alice: Client, agent: dict[str, Any]) -> None:
    assert agent["isolation"] == "vm" and agent["credential"] == "platform"
    listed = alice.ok("GET", "/v1/agents")["data"]
    assert agent["id"] in [a["id"] for a in listed]
    detail = alice.ok("GET", f"/v1/agents/{agent['id']}")
    assert detail["replicas"][0]["node_id"] and detail["capacity"] == 100
    stats = alice.ok("GET", "/v1/agents/stats")
    assert stats["agents"] >= 1 and sum(stats["per_node"].values()) == stats["replicas"]


def test_spawn_shorthand_keeps_the_key_secret(alice: Client) -> None:
    body = {"anthropic_api_key": "sk-ant-owner-secret", "cores": 0.25, "memory": 256}
    created = alice.ok("POST", "/v1/agents/spawn", 201, json=body)
    assert created["credential"] == "own" and created["resources"]["cores"] == 0.25
    for response in (
        json.dumps(created),
        alice.request("GET", f"/v1/agents/{created['id']}").text,
        alice.request("GET", "/v1/agents").text,
    ):
        assert "sk-ant-owner-secret" not in response
    sid = new_session(alice, created["id"])
    alice.ok("DELETE", f"/v1/agents/{created['id']}")
    assert alice.request("GET", f"/v1/agents/{created['id']}").status_code == 404
    assert alice.request("GET", f"/v1/sessions/{sid}").status_code == 404


def test_conversation_json_stream_and_tools(alice: Client, agent: dict[str, Any]) -> None:
    sid = new_session(alice, agent["id"])
    assert alice.ok("GET", f"/v1/sessions/{sid}")["agent_id"] == agent["id"]
    turn = alice.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "Hello API"})
    assert turn["content"][0]["text"].startswith("You said: Hello API.")
    assert turn["usage"]["output_tokens"] > 0 and turn["cost_usd"] > 0
    streamed = alice.request(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"content": '[[tool bash {"command": "echo from-sse"}]]', "stream": True},
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    kinds = [e[0] for e in events]
    assert kinds[0] == "turn_start" and kinds[-1] == "turn_end"
    assert "tool_use" in kinds and "tool_result" in kinds
    assert [e[1] for e in events] == sorted(e[1] for e in events)
    result = next(e[2] for e in events if e[0] == "tool_result")
    assert result["content"] == "from-sse\n" and result["is_error"] is False
    page = alice.ok("GET", f"/v1/sessions/{sid}/messages", params={"limit": 1})
    assert page["version"] == 2 and len(page["turns"]) == 1 and page["has_more"] is True
    rest = alice.ok("GET", f"/v1/sessions/{sid}/messages", params={"after": 1})
    assert [t["index"] for t in rest["turns"]] == [2]
    row = usage_row(alice, agent["id"], turns=2)
    assert row["output_tokens"] > 0 and row["cost_usd"] > 0


def test_turns_are_metered_even_when_the_client_goes_away(alice: Client) -> None:
    created = alice.ok("POST", "/v1/agents", 201, json={"tools": ["bash"]})
    sid = new_session(alice, created["id"])
    with alice.http.stream(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"content": '[[tool bash {"command": "sleep 1; echo done"}]]', "stream": True},
        headers={"Authorization": f"Bearer {alice.key}"},
    ) as response:
        next(response.iter_lines())  # the first event, then hang up mid-turn
    # The turn still commits, and is billed once.
    usage_row(alice, created["id"], turns=1)
    assert alice.ok("GET", f"/v1/sessions/{sid}/messages")["version"] == 1
    replica = ray.get_actor(f"agent-{created['id']}-0", namespace="hyperfleet")
    ray.get(replica.send.remote(sid, "a batch turn"), timeout=TIMEOUT_S)
    usage_row(alice, created["id"], turns=2)  # batch jobs' turns are metered too
    alice.ok("DELETE", f"/v1/agents/{created['id']}")


def test_idempotent_resend(alice: Client, agent: dict[str, Any]) -> None:
    sid = new_session(alice, agent["id"])
    headers = {"Idempotency-Key": "resend-1"}
    first = alice.ok(
        "POST", f"/v1/sessions/{sid}/messages", json={"content": "once"}, headers=headers
    )
    again = alice.ok(
        "POST", f"/v1/sessions/{sid}/messages", json={"content": "once"}, headers=headers
    )
    assert again["turn_id"] == first["turn_id"] and again["replayed"] is True
    conflict = alice.request(
        "POST", f"/v1/sessions/{sid}/messages", json={"content": "other"}, headers=headers
    )
    assert conflict.status_code == 409
    assert conflict.json()["error"]["type"] == "idempotency_conflict"
    assert alice.ok("GET", f"/v1/sessions/{sid}/messages")["version"] == 1


def test_busy_session_is_409(alice: Client, agent: dict[str, Any], workspaces_root: Path) -> None:
    sid = new_session(alice, agent["id"])

    async def held_turn_running() -> bool:
        return await busy_sessions(agent["id"]) == 1

    async def both() -> list[int]:
        async with httpx.AsyncClient(base_url=alice.http.base_url, timeout=TIMEOUT_S) as http:
            headers = {"Authorization": f"Bearer {alice.key}"}
            held = http.post(
                f"/v1/sessions/{sid}/messages", json={"content": HELD_TURN}, headers=headers
            )
            task = asyncio.ensure_future(held)
            try:
                await wait_until_async(held_turn_running, "the held turn to be running")
                second = await http.post(
                    f"/v1/sessions/{sid}/messages", json={"content": "me too"}, headers=headers
                )
            finally:
                release_held_turns(workspaces_root, agent["id"], [sid])
            return [(await task).status_code, second.status_code]

    first, second = asyncio.run(both())
    assert (first, second) == (200, 409)


def test_batch_job_and_http_see_the_same_sessions(alice: Client, agent: dict[str, Any]) -> None:
    sid = new_session(alice, agent["id"])
    alice.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "over http"})
    replica = ray.get_actor(f"agent-{agent['id']}-0", namespace="hyperfleet")
    turn = ray.get(replica.send.remote(sid, "from a batch job"), timeout=TIMEOUT_S)
    assert turn["index"] == 2
    transcript = alice.ok("GET", f"/v1/sessions/{sid}/messages")
    assert [t["messages"][0]["content"] for t in transcript["turns"]] == [
        "over http",
        "from a batch job",
    ]


def test_error_statuses(alice: Client, agent: dict[str, Any], api_server: ApiServer) -> None:
    sid = new_session(alice, agent["id"])
    anonymous = Client(api_server.base_url, None)
    assert anonymous.request("GET", "/v1/agents").status_code == 401
    assert Client(api_server.base_url, "hf_nope").request("GET", "/v1/agents").status_code == 401
    unknown = alice.request("GET", "/v1/nowhere")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"
    assert alice.request("PUT", "/v1/agents").json()["error"]["type"] == "method_not_allowed"
    bad_json = alice.request(
        "POST",
        f"/v1/sessions/{sid}/messages",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_json"
    deep = alice.request("POST", f"/v1/sessions/{sid}/messages", content=b"[" * 100 + b"]" * 100)
    assert deep.status_code == 400
    big = alice.request("POST", f"/v1/sessions/{sid}/messages", content=b"x" * (1024 * 1024 + 10))
    assert big.status_code == 413
    schema = alice.request("POST", f"/v1/sessions/{sid}/messages", json={"content": 5})
    assert schema.status_code == 422 and "content" in schema.json()["error"]["message"]
    custom = alice.request("POST", "/v1/agents", json={"tools": ["os:system"]})
    assert custom.status_code == 422 and "not enabled" in custom.json()["error"]["message"]
    bad_spec = alice.request("POST", "/v1/agents", json={"max_turns": "lots"})
    assert bad_spec.status_code == 422 and "max_turns" in bad_spec.json()["error"]["message"]
    limit = alice.request("GET", f"/v1/sessions/{sid}/messages", params={"limit": "-4"})
    assert limit.status_code == 422
    # None of that changed the session.
    assert alice.ok("GET", f"/v1/sessions/{sid}/messages")["version"] == 0


def test_other_users_objects_are_404_everywhere(
    alice: Client, agent: dict[str, Any], admin: Client, api_server: ApiServer
) -> None:
    sid = new_session(alice, agent["id"])
    mallory = new_user(admin, api_server)
    aid = agent["id"]
    for method, path, body in [
        ("GET", f"/v1/agents/{aid}", None),
        ("DELETE", f"/v1/agents/{aid}", None),
        ("POST", f"/v1/agents/{aid}/sessions", None),
        ("GET", f"/v1/sessions/{sid}", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
        ("GET", f"/v1/sessions/{sid}/messages", None),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "hi"}),
    ]:
        response = mallory.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
    assert alice.ok("GET", f"/v1/sessions/{sid}/messages")["version"] == 0


def test_close_session(alice: Client, agent: dict[str, Any]) -> None:
    sid = new_session(alice, agent["id"])
    alice.ok("DELETE", f"/v1/sessions/{sid}")
    assert alice.request("GET", f"/v1/sessions/{sid}").status_code == 404
    assert (
        alice.request("POST", f"/v1/sessions/{sid}/messages", json={"content": "x"}).status_code
        == 404
    )


def test_rate_limit_holds_across_two_ingress_replicas(admin: Client, api_server: ApiServer) -> None:
    check_rate_limit(admin, api_server)


def test_quotas(admin: Client, api_server: ApiServer) -> None:
    capped = new_user(admin, api_server, max_agents=1, tokens_per_day=4500)
    system = "policy " * 600  # the first turn uses over 600 input tokens
    created = capped.ok("POST", "/v1/agents", 201, json={"max_tokens": 4000, "system": system})
    second = capped.request("POST", "/v1/agents", json={})
    assert second.status_code == 403 and second.json()["error"]["type"] == "quota_exceeded"
    sid = new_session(capped, created["id"])
    capped.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "fits"})
    try:
        # 4,000 reserved on top of the 600+ the first turn used exceeds 4,500 tokens per day.
        over = capped.request("POST", f"/v1/sessions/{sid}/messages", json={"content": "more"})
        assert over.status_code == 403 and "tokens per day" in over.json()["error"]["message"]
    finally:
        capped.ok("DELETE", f"/v1/agents/{created['id']}")


def test_full_replica_is_503_with_retry_after(alice: Client, workspaces_root: Path) -> None:
    small = alice.ok("POST", "/v1/agents", 201, json={"max_sessions": 1, "tools": ["bash"]})
    new_session(alice, small["id"])
    sid = new_session(alice, small["id"])  # the idle first session is evicted to make room
    running = alice.http.build_request(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"content": HELD_TURN},
        headers={"Authorization": f"Bearer {alice.key}"},
    )

    async def held_turn_running() -> bool:
        return await busy_sessions(small["id"]) == 1

    async def full() -> httpx.Response:
        async with httpx.AsyncClient(base_url=alice.http.base_url, timeout=TIMEOUT_S) as http:
            task = asyncio.ensure_future(http.send(running))
            try:
                await wait_until_async(held_turn_running, "the held turn to be running")
                third = await http.post(
                    f"/v1/agents/{small['id']}/sessions",
                    headers={"Authorization": f"Bearer {alice.key}"},
                )
            finally:
                release_held_turns(workspaces_root, small["id"], [sid])
            assert (await task).status_code == 200
            return third

    third = asyncio.run(full())
    assert third.status_code == 503
    assert int(third.headers["Retry-After"]) >= 1
    assert third.json()["error"]["type"] == "capacity_exhausted"
    alice.ok("DELETE", f"/v1/agents/{small['id']}")


def test_deleting_an_agent_removes_its_workspace_files(
    alice: Client, workspaces_root: Path
) -> None:
    created = alice.ok("POST", "/v1/agents", 201, json={"tools": ["bash"]})
    sid = new_session(alice, created["id"])
    write = '[[tool bash {"command": "echo kept > note.txt"}]]'
    alice.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": write})
    note = workspaces_root / created["id"] / sid / "note.txt"
    assert note.read_text() == "kept\n"
    alice.ok("DELETE", f"/v1/agents/{created['id']}")
    assert not (workspaces_root / created["id"]).exists()


def test_only_an_administrator_places_a_shell_beside_others(
    admin: Client, alice: Client, api_server: ApiServer
) -> None:
    head = ray.get_runtime_context().get_node_id()  # the local cluster's one node, its head
    shared_shell = {
        "tools": ["bash"],
        "isolation": "shared",
        "resources": {"cores": 0.25, "memory_mb": 128},
    }
    refused = alice.request("POST", "/v1/agents", json=shared_shell)
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith(
        "isolation:"
    )
    pinned = {"tools": ["read_file"], "label_selector": {"ray.io/node-id": head}}
    refused = alice.request("POST", "/v1/agents", json=pinned)
    assert refused.status_code == 422
    assert "label_selector.ray.io/node-id" in refused.json()["error"]["message"]
    # An administrator's agents are the platform's own: packed, pinned, as asked.
    created = admin.ok("POST", "/v1/agents", 201, json={**shared_shell, **pinned})
    try:
        assert created["isolation"] == "shared" and created["status"] == "ready"
        detail = admin.ok("GET", f"/v1/agents/{created['id']}")
        assert detail["replicas"][0]["node_id"] == head
    finally:
        admin.ok("DELETE", f"/v1/agents/{created['id']}")


def test_open_sessions_are_a_quota(admin: Client, api_server: ApiServer) -> None:
    capped = new_user(admin, api_server, max_sessions=2)
    created = capped.ok("POST", "/v1/agents", 201, json={"tools": ["read_file"]})
    try:
        first, _ = new_session(capped, created["id"]), new_session(capped, created["id"])
        over = capped.request("POST", f"/v1/agents/{created['id']}/sessions")
        assert over.status_code == 403 and over.json()["error"]["type"] == "quota_exceeded"
        assert over.json()["error"]["message"].startswith("max_sessions: you have 2 open")
        # The session the replica opened for the refused request was closed again.
        assert capped.ok("GET", f"/v1/agents/{created['id']}")["sessions"] == 2
        capped.ok("DELETE", f"/v1/sessions/{first}")
        new_session(capped, created["id"])
        admin.ok("PATCH", f"/v1/users/{capped.user_id}", json={"quotas": {"max_sessions": 1}})
        lowered = capped.request("POST", f"/v1/agents/{created['id']}/sessions")
        assert lowered.status_code == 403  # at once, whichever ingress replica answers
    finally:
        capped.ok("DELETE", f"/v1/agents/{created['id']}")


def test_a_users_keys_share_its_rate_limit_and_are_bounded(
    admin: Client, api_server: ApiServer
) -> None:
    limited = new_user(admin, api_server, requests_per_minute=8, max_keys=3)
    # The admin mints the keys, so that only the requests below count in the user's minute.
    second = admin.ok("POST", f"/v1/users/{limited.user_id}/keys", 201)
    other = Client(api_server.base_url, second["api_key"], limited.user_id)
    responses = [c.request("GET", "/v1/agents") for _ in range(8) for c in (limited, other)]
    admitted = [r for r in responses if r.status_code == 200]
    assert len(admitted) == 8, [r.status_code for r in responses]
    assert {r.status_code for r in responses} == {200, 429}
    assert [r.headers["ratelimit-remaining"] for r in admitted] == [
        str(n) for n in range(7, -1, -1)
    ]
    third = admin.ok("POST", f"/v1/users/{limited.user_id}/keys", 201)
    refused = admin.request("POST", f"/v1/users/{limited.user_id}/keys")
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["type"] == "quota_exceeded"
    assert refused.json()["error"]["message"].startswith("max_keys: you have 3 live API keys")
    admin.ok("DELETE", f"/v1/keys/{third['prefix']}")  # a revoked key frees its place
    admin.ok("POST", f"/v1/users/{limited.user_id}/keys", 201)
    other.http.close()
