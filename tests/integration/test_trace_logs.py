"""A request's trace in the logs: the id the ingress answers with, and the client's
``traceparent``, on the JSON lines of the ingress and of the replica that ran the turn, down to
the model call and its Anthropic ``request-id``. Real Serve, replicas and the emulator; the lines
are read from Ray's session logs, where a worker's stderr goes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from .api_client import Client, new_session, new_user
from .conftest import ApiServer
from .waiting import wait_until

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def admin(api_server: ApiServer) -> Iterator[Client]:
    client = Client(api_server.base_url, api_server.admin_key)
    yield client
    client.http.close()


def _log_lines(request_id: str) -> list[dict[str, Any]]:
    """Every JSON log line of the cluster's workers that carries ``request_id``."""
    node = ray._private.worker._global_node
    assert node is not None  # this driver is connected
    logs_dir = Path(node.get_logs_dir_path())
    found = []
    for path in logs_dir.glob("worker-*.err"):
        for line in path.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                found.append(json.loads(line))
    return found


def test_a_requests_id_and_traceparent_reach_the_model_calls_log_line(
    admin: Client, api_server: ApiServer
) -> None:
    user = new_user(admin, api_server)
    agent = user.ok("POST", "/v1/agents", 201, json={"tools": ["bash"]})
    sid = new_session(user, agent["id"])
    request_id = "trace-" + uuid.uuid4().hex
    response = user.request(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"content": '[[tool bash {"command": "echo traced"}]]'},
        headers={"x-request-id": request_id, "traceparent": TRACEPARENT},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id

    def model_calls() -> list[dict[str, Any]] | None:
        lines = [
            line for line in _log_lines(request_id) if line["message"].startswith("model call")
        ]
        return lines if len(lines) >= 2 else None  # the tool's call and the answer's

    calls = wait_until(model_calls, "the replica's model-call log lines", 30)
    for line in calls:
        assert line["role"] == "replica" and line["level"] == "INFO"
        assert line["traceparent"] == TRACEPARENT
        assert line["session_id"] == sid and line["agent_id"] == agent["id"]
        assert str(line["model_request_id"]).startswith("req_")  # the emulator's request-id
    assert len({line["model_request_id"] for line in calls}) == len(calls)
    user.ok("DELETE", f"/v1/agents/{agent['id']}")


def test_an_id_is_made_for_a_request_without_one_and_a_bad_traceparent_dropped(
    admin: Client, api_server: ApiServer
) -> None:
    user = new_user(admin, api_server)
    response = user.request("GET", "/v1/agents", headers={"traceparent": "garbage"})
    assert response.status_code == 200
    assert len(response.headers["x-request-id"]) >= 16
