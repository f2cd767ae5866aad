"""A tenant's own Anthropic key is found nowhere in plain text: not in the control store's or the
session store's files (their WAL included), not in Ray's session logs, not in the tools'
workspaces, not in any HTTP answer (bodies and headers).

The key is a canary, unique to this run, and it is the only key the emulator behind this module's
app accepts: a turn that completes proves the replica called the model with it (had the spec's
key been lost on the way, the platform's key would be refused and the turn would fail).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import ray

from cluster.cli.servers import start_emulator
from hyperfleet.processes import free_port, stop

from .api_client import Client, new_session
from .conftest import ApiServer

CANARY = "sk-ant-canary-" + uuid.uuid4().hex
SEARCH_CHUNK_BYTES = 4 * 1024 * 1024
SEARCH_MAX_FILE_BYTES = 256 * 1024 * 1024  # larger files are named, not searched
SEARCH_DEADLINE_S = 120.0
TOOL = json.dumps({"command": "env; echo sandbox-ran"})


@dataclass
class Recorder:
    """Every HTTP answer the test received, headers and body, as one text each."""

    answers: list[str] = field(default_factory=list)

    def hook(self, response: httpx.Response) -> None:
        response.read()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.answers.append(f"{response.status_code}\n{headers}\n\n{response.text}")


@pytest.fixture(scope="module")
def canary_api(api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's app, its replicas' model calls sent to an emulator that takes the canary
    alone; the session's own app is put back afterwards."""
    from ray import serve

    from serve_app import APP_NAME, build

    log = tmp_path_factory.mktemp("canary-emulator") / "emulator.log"
    port = free_port()
    emulator = start_emulator(port, CANARY, log, "--retry-after-ms", "10")
    runtime = {**api_server.config["runtime"], "anthropic_base_url": f"http://127.0.0.1:{port}"}
    config = {**api_server.config, "runtime": runtime}
    serve.run(build(config, num_replicas=2), name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.run(build(api_server.config, num_replicas=2), name=APP_NAME, route_prefix="/")
        stop(emulator)


def _recording(client: Client, recorder: Recorder) -> Client:
    client.http.event_hooks["response"] = [recorder.hook]
    return client


def _ray_session_dir() -> Path:
    node = ray._private.worker._global_node
    if node is not None:
        return Path(node.get_session_dir_path())
    return Path("/tmp/ray/session_latest")


def _files_holding(needle: bytes, roots: list[Path]) -> tuple[list[str], list[str]]:
    """(files under ``roots`` that hold ``needle``, files too large to search), read in chunks
    that overlap by the needle's length, within ``SEARCH_DEADLINE_S``."""
    deadline = time.monotonic() + SEARCH_DEADLINE_S
    found: list[str] = []
    skipped: list[str] = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            assert time.monotonic() < deadline, f"the search ran past {SEARCH_DEADLINE_S} s"
            if not path.is_file() or path.is_symlink():
                continue
            try:
                if path.stat().st_size > SEARCH_MAX_FILE_BYTES:
                    skipped.append(str(path))
                    continue
                with path.open("rb") as f:
                    tail = b""
                    while chunk := f.read(SEARCH_CHUNK_BYTES):
                        if needle in tail + chunk:
                            found.append(str(path))
                            break
                        tail = chunk[-len(needle) :]
            except (FileNotFoundError, PermissionError):
                continue  # a log rotated away, or a sandbox user's file
    return found, skipped


def test_a_tenants_key_is_nowhere_in_plain_text(
    canary_api: str, api_server: ApiServer, workspaces_root: Path
) -> None:
    recorder = Recorder()
    admin = _recording(Client(api_server.base_url, api_server.admin_key), recorder)
    created = admin.ok("POST", "/v1/users", 201, json={"name": "canary"})
    tenant = _recording(Client(api_server.base_url, created["api_key"]), recorder)
    spec = {"tools": ["bash"], "anthropic_api_key": CANARY}
    agent = tenant.ok("POST", "/v1/agents", 201, json=spec)
    spawned = tenant.ok(
        "POST", "/v1/agents/spawn", 201, json={"anthropic_api_key": CANARY, "tools": ["bash"]}
    )
    try:
        assert agent["credential"] == "own" and spawned["credential"] == "own"
        tenant.ok("GET", f"/v1/agents/{agent['id']}")
        tenant.ok("GET", "/v1/agents")
        tenant.ok("GET", "/v1/agents/stats")
        sid = new_session(tenant, agent["id"])
        path = f"/v1/sessions/{sid}/messages"
        turn = tenant.ok("POST", path, json={"content": "Hello with my own key"})
        assert turn["content"][0]["text"].startswith("You said: Hello with my own key.")
        streamed = tenant.request(
            "POST", path, json={"content": f"[[tool bash {TOOL}]]", "stream": True}
        )
        assert streamed.status_code == 200 and "sandbox-ran" in streamed.text, streamed.text
        tenant.ok("GET", f"{path}?limit=10")
        tenant.ok("GET", "/v1/usage")
        tenant.ok("GET", f"/v1/users/{created['id']}")
    finally:
        for made in (agent, spawned):
            tenant.request("DELETE", f"/v1/agents/{made['id']}")
    assert len(recorder.answers) >= 12
    leaked_in_answers = [a[:200] for a in recorder.answers if CANARY in a]
    assert leaked_in_answers == []

    roots = [api_server.data_dir, _ray_session_dir() / "logs", workspaces_root]
    found, skipped = _files_holding(CANARY.encode(), roots)
    assert found == [], f"the tenant's key in plain text in: {found}"
    assert skipped == [], f"too large to search: {skipped}"
    assert any(api_server.data_dir.glob("control.db*"))  # the search did see the store
