"""Agent replicas as real Ray actors: placement, sessions over Ray, streaming, crash recovery,
the sandbox's view of the node, and the README's batch-job snippet."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from actors import AgentSpec, Resources, RuntimeConfig, spawn_replica, start_store_actor

from .conftest import EmulatorServer, RayCluster
from .waiting import processes_with, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
CALL_TIMEOUT_S = 60
RESTART_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def runtime(
    ray_cluster: RayCluster,
    emulator: EmulatorServer,
    workspaces_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> RuntimeConfig:
    store = start_store_actor(tmp_path_factory.mktemp("store") / "sessions.db")
    assert ray.get(store.ping.remote(), timeout=CALL_TIMEOUT_S)
    return RuntimeConfig(
        anthropic_base_url=emulator.base_url,
        anthropic_api_key=emulator.api_key,  # type: ignore[arg-type]
        workspaces=str(workspaces_root),
    )


@pytest.fixture
def agent(runtime: RuntimeConfig) -> Iterator[tuple[str, Any]]:
    agent_id = "t" + uuid.uuid4().hex[:8]
    spec = AgentSpec(
        tools=("bash", "read_file", "write_file"),
        resources=Resources(cores=0.5, memory_mb=256),
        system="You are a test agent.",
    )
    handle = spawn_replica(agent_id, 0, spec, runtime)
    yield agent_id, handle
    ray.kill(handle, no_restart=True)


def _get(ref: Any) -> Any:
    return ray.get(ref, timeout=CALL_TIMEOUT_S)


def _text(turn: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in turn["content"])


def test_replica_is_named_placed_and_serves(
    agent: tuple[str, Any], ray_cluster: RayCluster
) -> None:
    agent_id, handle = agent
    assert ray.get_actor(f"agent-{agent_id}-0", namespace="hyperfleet")
    stats = _get(handle.stats.remote())
    assert stats["replica"] == f"agent-{agent_id}-0"
    assert stats["resources"]["CPU"] == 0.5
    assert stats["resources"]["hyperfleet_vm_slot"] == 1.0  # bash implies isolation: vm
    assert _get(handle.health.remote()) == "ok"
    session = _get(handle.open_session.remote(owner="alice"))
    turn = _get(handle.send.remote(session["id"], "hello over ray"))
    assert _text(turn).startswith("You said: hello over ray.")
    events = [
        _get(ref)
        for ref in handle.stream.remote(session["id"], '[[tool bash {"command": "echo hi"}]]')
    ]
    assert events[0]["type"] == "turn_start"
    assert events[-1]["type"] == "turn_end" and events[-1]["data"]["index"] == 2
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["data"] == {
        "tool_use_id": result["data"]["tool_use_id"],
        "content": "hi\n",
        "is_error": False,
    }
    transcript = _get(handle.transcript.remote(session["id"]))
    assert transcript["version"] == 2


def test_errors_cross_ray_typed(agent: tuple[str, Any]) -> None:
    from actors import NotFoundError

    _, handle = agent
    with pytest.raises(NotFoundError):
        _get(handle.send.remote("ses_nope", "hi"))
    session = _get(handle.open_session.remote(owner="alice"))
    with pytest.raises(NotFoundError):
        _get(handle.send.remote(session["id"], "hi", owner="mallory"))


def _healthy(handle: Any) -> bool:
    try:
        return bool(ray.get(handle.health.remote(), timeout=10) == "ok")
    except (RayActorError, ray.exceptions.GetTimeoutError):
        return False


def test_kill_9_mid_turn_loses_nothing_acknowledged(agent: tuple[str, Any]) -> None:
    _, handle = agent
    sid = _get(handle.open_session.remote(owner="alice"))["id"]
    first = _get(handle.send.remote(sid, "turn one", idempotency_key="one"))
    pid = _get(handle.stats.remote())["pid"]
    command = f"sleep 2; echo slept {uuid.uuid4().hex}"  # this test's tool process alone
    slow = "[[tool bash " + json.dumps({"command": command}) + "]]"
    pending = handle.send.remote(sid, slow, idempotency_key="two")
    wait_until(lambda: processes_with(command.encode()), "the turn's tool call", CALL_TIMEOUT_S)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RayActorError):
        ray.get(pending, timeout=CALL_TIMEOUT_S)
    wait_until(lambda: _healthy(handle), "the restarted replica", RESTART_TIMEOUT_S, 0.5)
    assert _get(handle.stats.remote())["pid"] != pid
    transcript = _get(handle.transcript.remote(sid))
    assert transcript["version"] == 1  # the interrupted turn is simply absent
    assert transcript["turns"][0]["turn_id"] == first["turn_id"]
    resent = _get(handle.send.remote(sid, slow, idempotency_key="two"))
    assert resent["index"] == 2 and "slept" in _text(resent)
    again = _get(handle.send.remote(sid, "turn one", idempotency_key="one"))
    assert again["turn_id"] == first["turn_id"]


def test_sandboxed_bash_cannot_read_the_token_or_reach_ray(
    agent: tuple[str, Any], ray_cluster: RayCluster
) -> None:
    _, handle = agent
    assert ray_cluster.token_path.read_text()  # the token exists on this node
    sid = _get(handle.open_session.remote(owner="alice"))["id"]
    gcs_host = ray_cluster.address.split(":")[0]
    node_ip = ray.util.get_node_ip_address()
    probe = (
        f"cat {ray_cluster.token_path} ~/.ray/auth_token /root/.ray/auth_token; "
        f"ls /tmp/ray; "
        f"(exec 3<>/dev/tcp/{gcs_host}/{ray_cluster.gcs_port}) && echo CONNECTED-LOOPBACK; "
        f"(exec 3<>/dev/tcp/{node_ip}/{ray_cluster.gcs_port}) && echo CONNECTED-NODE; "
        "id -u"
    )
    import json

    turn = _get(handle.send.remote(sid, "[[tool bash " + json.dumps({"command": probe}) + "]]"))
    text = _text(turn)
    assert ray_cluster.token_path.read_text() not in text
    assert "No such file or directory" in text
    assert "CONNECTED" not in text
    assert re.search(r"connect: (Network is unreachable|Connection refused)", text)
    if os.geteuid() == 0:
        assert "65534" in text  # root's replicas run tools as nobody


def test_label_selector_pins_a_replica(runtime: RuntimeConfig) -> None:
    node_id = ray.get_runtime_context().get_node_id()
    spec = AgentSpec(
        resources=Resources(cores=0.25, memory_mb=128), label_selector={"ray.io/node-id": node_id}
    )
    handle = spawn_replica("t" + uuid.uuid4().hex[:8], 0, spec, runtime)
    try:
        assert _get(handle.stats.remote())["node_id"] == node_id
    finally:
        ray.kill(handle, no_restart=True)


def _batch_snippet() -> str:
    match = re.search(
        r"<!-- batch-snippet -->\s*```python\n(.*?)```", README.read_text(), re.DOTALL
    )
    assert match, "README lost its batch-job snippet"
    return match.group(1)


def test_readme_batch_snippet_runs(runtime: RuntimeConfig, ray_cluster: RayCluster) -> None:
    spec = AgentSpec(resources=Resources(cores=0.25, memory_mb=128))
    handle = spawn_replica("demo", 0, spec, runtime)
    try:
        _get(handle.health.remote())
        done = subprocess.run(
            [sys.executable, "-c", _batch_snippet()],
            env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.strip().splitlines()
        assert lines[0].startswith("end_turn ")
        assert lines[-1] == "turns committed: 2"
    finally:
        ray.kill(handle, no_restart=True)


def test_an_egress_replica_runs_its_tools_behind_the_cluster_wide_firewall(
    runtime: RuntimeConfig,
) -> None:
    """A replica of an egress agent lists the cluster's nodes from Ray's node table (in a
    thread of the actor) before its first egress tool runs, then runs it."""
    if os.geteuid() != 0:
        pytest.skip("the egress firewall needs root")
    spec = AgentSpec(tools=("bash",), egress=True, resources=Resources(cores=0.25, memory_mb=128))
    handle = spawn_replica("t" + uuid.uuid4().hex[:8], 0, spec, runtime)
    try:
        sid = _get(handle.open_session.remote(owner="alice"))["id"]
        turn = _get(handle.send.remote(sid, '[[tool bash {"command": "echo behind-it"}]]'))
        # Not "the cluster's nodes cannot be listed": the firewall had them, and let it run.
        assert _text(turn) == 'The tool bash returned: "behind-it".'
    finally:
        ray.kill(handle, no_restart=True)
