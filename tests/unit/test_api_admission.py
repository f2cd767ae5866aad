"""The HTTP app's one admission step and one route table, on the real control store in-process.

Admission runs once per request, by the route's kind (``serve_app.routes``), and every answer to
an admitted request carries its rate-limit headers, errors included; the OpenAPI document is made
from the same table the app serves. Only routes that need no agent replica are driven here (no
Ray in the unit tier); ``tests/integration/test_api.py`` drives them all over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from actors import RuntimeConfig
from serve_app.admission import ControlGate
from serve_app.app import Api
from serve_app.control import ControlStore
from serve_app.replicas import Replicas
from serve_app.routes import ROUTES, Open, build_app

from .in_process_control import InProcessControl

IP_PER_MINUTE = 50


@pytest.fixture
def http(tmp_path: Path) -> Iterator[tuple[TestClient, ControlStore]]:
    store = ControlStore(tmp_path / "control.db")
    control: Any = InProcessControl(store)
    api = Api(control, Replicas(RuntimeConfig()), ControlGate(control), IP_PER_MINUTE)
    with TestClient(build_app(api)) as client:
        yield client, store
    store.close()


def _rate_headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith(("ratelimit-", "retry-"))}


def test_every_answer_to_an_admitted_request_carries_its_rate_limit_headers(
    http: tuple[TestClient, ControlStore],
) -> None:
    client, store = http
    store.create_user("usr_a", "a", {"requests_per_minute": 7})
    auth = {"Authorization": "Bearer " + store.issue_key("usr_a").api_key}
    answers = [
        client.get("/v1/users/usr_a", headers=auth),  # 200
        client.get("/v1/users/usr_other", headers=auth),  # 404
        client.patch("/v1/users/usr_a", json={"quotas": {}}, headers=auth),  # 403: not an admin
        client.post("/v1/users/usr_a/keys", headers=auth),  # 201
        client.post("/v1/sessions/ses_x/messages", json={"content": ""}, headers=auth),  # 422
        client.post("/v1/sessions/ses_x/messages", json={"content": "hi"}, headers=auth),  # 404
        client.get("/v1/usage", headers=auth),  # 200
        client.get("/v1/usage", headers=auth),  # 429: the eighth request of seven a minute
    ]
    assert [a.status_code for a in answers] == [200, 404, 403, 201, 422, 404, 200, 429]
    for n, answer in enumerate(answers[:-1]):
        assert _rate_headers(answer) == {
            "ratelimit-limit": "7",
            "ratelimit-remaining": str(6 - n),
            "ratelimit-reset": "60",
        }, answer.text
    assert _rate_headers(answers[-1]) == {
        "ratelimit-limit": "7",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "60",
        "retry-after": "60",
    }
    assert answers[-1].json() == {
        "error": {"type": "rate_limited", "message": "too many requests; slow down"}
    }
    # Every error says whether the same request may pass later: a 429 may, a 404 or 403 not.
    assert [a.headers.get("x-should-retry") for a in answers] == [
        None,
        "false",
        "false",
        None,
        "false",
        "false",
        None,
        "true",
    ]


def test_a_request_without_a_valid_key_is_told_so_with_its_address_window(
    http: tuple[TestClient, ControlStore],
) -> None:
    client, _ = http
    missing = client.get("/v1/usage")
    invalid = client.get("/v1/usage", headers={"x-api-key": "hf_000000000000_" + "x" * 32})
    assert missing.json()["error"] == {"type": "unauthorized", "message": "missing API key"}
    assert invalid.json()["error"] == {"type": "unauthorized", "message": "invalid API key"}
    assert [_rate_headers(r)["ratelimit-remaining"] for r in (missing, invalid)] == [
        str(IP_PER_MINUTE - 1),
        str(IP_PER_MINUTE - 2),
    ]


def test_open_routes_take_no_key_and_count_against_no_window(
    http: tuple[TestClient, ControlStore],
) -> None:
    client, _ = http
    for _ in range(IP_PER_MINUTE + 1):
        health = client.get("/health")
    assert health.status_code == 200 and _rate_headers(health) == {}
    assert client.get("/openapi.json").status_code == 200
    assert _rate_headers(client.get("/v1/usage"))["ratelimit-remaining"] == str(IP_PER_MINUTE - 1)


def test_the_openapi_document_is_the_route_table(http: tuple[TestClient, ControlStore]) -> None:
    client, _ = http
    document = client.get("/openapi.json").json()
    listed = sorted((path, method) for path, ops in document["paths"].items() for method in ops)
    served = sorted((r.operation.path, r.operation.method) for r in ROUTES)
    assert listed == [s for s in served if s != ("/openapi.json", "get")]
    for route in ROUTES:
        assert route.operation.authenticated == (not isinstance(route, Open))
        if route.operation.documented:
            operation = document["paths"][route.operation.path][route.operation.method]
            assert ("security" in operation) == route.operation.authenticated
            assert str(route.operation.status) in operation["responses"]


async def test_a_flood_of_ready_probes_makes_one_control_store_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import httpx

    from actors.store.actor import ActorSessionStore

    store = ControlStore(tmp_path / "control.db")
    calls = {"control_store": 0, "session_store": 0}
    has_admin = store.has_admin

    def counted_has_admin() -> bool:
        calls["control_store"] += 1
        return has_admin()

    async def counted_ping(self: ActorSessionStore) -> None:
        calls["session_store"] += 1
        await asyncio.sleep(0.01)  # a Ray hop: the probes overlap it

    monkeypatch.setattr(store, "has_admin", counted_has_admin)
    monkeypatch.setattr(ActorSessionStore, "ping", counted_ping)
    control: Any = InProcessControl(store)
    api = Api(control, Replicas(RuntimeConfig()), ControlGate(control), IP_PER_MINUTE)
    transport = httpx.ASGITransport(app=build_app(api))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answers = await asyncio.gather(*(client.get("/ready") for _ in range(50)))
    assert {a.status_code for a in answers} == {200}
    assert answers[0].json() == {"ready": True, "control_store": "ok", "session_store": "ok"}
    # One check for the flood, not two store calls per probe (100 before the cache).
    assert calls == {"control_store": 1, "session_store": 1}
    store.close()


@pytest.mark.parametrize(
    "query", ["limit=²", "after=²", "limit=٣", "limit=" + "9" * 5000, "limit=-1", "after=1.5"]
)
def test_a_transcript_page_that_is_not_an_ascii_integer_is_a_422(
    http: tuple[TestClient, ControlStore], query: str
) -> None:
    client, store = http
    store.create_user("usr_a", "a", {})
    auth = {"Authorization": "Bearer " + store.issue_key("usr_a").api_key}
    store.create_agent("agt_a", "usr_a", "{}", 1, 10)
    store.add_route("ses_a", "agt_a", "usr_a", 0)
    answer = client.get(f"/v1/sessions/ses_a/messages?{query}", headers=auth)
    assert answer.status_code == 422, answer.text  # "²".isdigit() was a 500
    name = query.split("=")[0]
    assert answer.json()["error"]["message"].startswith(f"{name}: must be an integer")


def test_the_openapi_document_describes_live_sessions(
    http: tuple[TestClient, ControlStore],
) -> None:
    client, _ = http
    document = client.get("/openapi.json").json()
    message = document["components"]["schemas"]["MessageIn"]["properties"]
    assert message["if_busy"]["enum"] == ["reject", "enqueue", "interrupt"]
    assert message["background"]["type"] == "boolean"
    send = document["paths"]["/v1/sessions/{session_id}/messages"]["post"]
    assert "202" in send["responses"]
    assert "text/event-stream" in send["responses"]["200"]["content"]
    events = document["paths"]["/v1/sessions/{session_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    headers = {p["name"] for p in events["parameters"] if p["in"] == "header"}
    assert headers == {"Last-Event-ID"}
    assert "/v1/sessions/{session_id}/turns/{turn_id}" in document["paths"]
