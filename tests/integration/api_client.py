"""The HTTP API as the integration tests drive it, with either admission gate behind it.

A client for one user's key, the calls every API test starts with (a user, a session), reading
metered usage, the rate-limit scenario both gates must pass, and a turn the test holds running
until it lets it go, so that what happens "while a turn runs" needs no guess at how long it runs.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import ray

from actors import NAMESPACE, replica_name

from .conftest import ApiServer
from .waiting import wait_until

TIMEOUT_S = 60.0
METERING_WAIT_S = 10.0
HOLD_S = 30  # a held turn lets itself go after this long (under the tool's 60 s default limit)
RELEASE_FILE = "release"

# A bash tool call that runs until the test puts RELEASE_FILE in the session's workspace.
HELD_TURN = (
    "[[tool bash "
    + json.dumps(
        {
            "command": f"for _ in $(seq {HOLD_S * 10}); do "
            f"[ -e {RELEASE_FILE} ] && echo released && exit 0; sleep 0.1; done; exit 1"
        }
    )
    + "]]"
)


class Client:
    def __init__(self, base_url: str, key: str | None, user_id: str = "") -> None:
        self.http = httpx.Client(base_url=base_url, timeout=TIMEOUT_S)
        self.key = key
        self.user_id = user_id

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.key is not None:
            headers.setdefault("Authorization", f"Bearer {self.key}")
        return self.http.request(method, path, headers=headers, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()


def new_user(admin: Client, api_server: ApiServer, **quotas: Any) -> Client:
    """A new user (with ``quotas``, else the defaults), as a client holding its first key."""
    body: dict[str, Any] = {"name": "u-" + uuid.uuid4().hex[:6]}
    if quotas:
        body["quotas"] = quotas
    created = admin.ok("POST", "/v1/users", 201, json=body)
    assert created["api_key"].startswith("hf_")
    return Client(api_server.base_url, created["api_key"], created["id"])


def new_session(client: Client, agent_id: str) -> str:
    return str(client.ok("POST", f"/v1/agents/{agent_id}/sessions", 201)["id"])


def usage_row(client: Client, agent_id: str, turns: int) -> dict[str, Any]:
    """The agent's usage row once it counts ``turns`` turns (metering is asynchronous)."""
    rows: list[dict[str, Any]] = []

    def counted() -> dict[str, Any] | None:
        rows[:] = client.ok("GET", "/v1/usage")["data"]
        row = next((r for r in rows if r["agent_id"] == agent_id), {"turns": 0})
        return dict(row) if row["turns"] >= turns else None

    row = wait_until(counted, f"{turns} metered turns of {agent_id}", METERING_WAIT_S)
    assert row["turns"] == turns, rows
    return row


def check_rate_limit(admin: Client, api_server: ApiServer) -> None:
    """A user limited to 30 requests a minute gets exactly 30 of 45, whichever of the two
    ingress replicas answers each."""
    limited = new_user(admin, api_server, requests_per_minute=30)
    statuses = [limited.request("GET", "/v1/agents") for _ in range(45)]
    admitted = [r for r in statuses if r.status_code == 200]
    refused = [r for r in statuses if r.status_code == 429]
    assert len(admitted) == 30 and len(refused) == 15
    assert admitted[-1].headers["ratelimit-remaining"] == "0"
    assert admitted[0].headers["ratelimit-limit"] == "30"
    assert int(refused[0].headers["Retry-After"]) >= 1
    assert refused[0].json()["error"]["type"] == "rate_limited"


async def busy_sessions(agent_id: str) -> int:
    """How many sessions of the agent's first replica are running a turn (its own stats)."""
    replica = ray.get_actor(replica_name(agent_id, 0), namespace=NAMESPACE)
    return int((await replica.stats.remote())["busy_sessions"])


def release_held_turns(workspaces_root: Path, agent_id: str, session_ids: list[str]) -> None:
    """Lets each session's ``HELD_TURN`` finish."""
    for session_id in session_ids:
        (workspaces_root / agent_id / session_id / RELEASE_FILE).touch()
