"""End to end on one machine: autoscaler v2 with ``HypercoreNodeProvider`` scales a real cluster.

The head is a Hypercore workload of the stand-in, created through the provider as ``ray up``
creates it, whose node agent runs autoscaler v2 with the provider. An agent replica that needs a
VM slot (the head has none) makes the autoscaler Spawn a worker workload; the replica runs there
and serves a session. SIGTERM to that busy node's workload process drains it, and the session
continues on another node with its transcript. Once the agent is deleted, the idle node is drained
and its workload Stopped.

Then the API and its pool controller run in the cluster, driven over HTTP: an agent's pool grows
past the VMs it has (a replica waits for the VM the autoscaler Spawns for it) and shrinks back,
and the VM it left idle is Stopped (``benchmarks/pool_ramp.py`` records the same ramp).

The cluster is a second Ray cluster, driven from a subprocess (``autoscaler_driver``): this
pytest process is already a driver of the session's cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.hypercore import HypercoreClient
from cluster.hypercore_standin import StandinHandle
from hyperfleet.processes import reap_leftovers

from .autoscaling_cluster import (
    Driver,
    Head,
    autoscaling_config,
    cluster_processes,
    cluster_workloads,
    node_agent_pid,
    start_head,
    start_standin_for,
)
from .conftest import EmulatorServer
from .pool_load import MAX_SESSIONS, PoolLoad, Talker, start_api, vm_agent_spec

# One bound for each step that waits on the autoscaler (a node start takes ~10-30 s here).
STEP_TIMEOUT_S = 150.0
CALL_TIMEOUT_S = 60.0
IDLE_TIMEOUT_MINUTES = 0.25

T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, emulator: EmulatorServer
) -> Iterator[tuple[StandinHandle, Head, Driver, str]]:
    root = tmp_path_factory.mktemp("autoscaling")
    name = "e2e" + uuid.uuid4().hex[:6]
    standin = start_standin_for(root)
    head: Head | None = None
    driver: Driver | None = None
    try:
        config = autoscaling_config(standin, name, root, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
        head = start_head(root, config)
        driver = Driver(head, root / "driver.log")
        driver.call("setup_store", CALL_TIMEOUT_S, path=str(root / "sessions.db"))
        yield standin, head, driver, name
    finally:
        # Each step on its own: one failing must not leave the others' processes behind.
        with contextlib.suppress(Exception):
            if driver is not None:
                driver.close()
        with contextlib.suppress(Exception):
            if head is not None:
                head.stop()
        standin.stop()  # stops every workload it still runs
        reap_leftovers(cluster_processes(name))


def eventually(check: Callable[[], T | None], what: str, head: Head) -> T:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    result = None
    while time.monotonic() < deadline:
        result = check()
        if result is not None and result is not False:
            return result
        time.sleep(1.0)
    raise AssertionError(
        f"timed out after {STEP_TIMEOUT_S:.0f} s waiting for {what} (last: {result});\n"
        f"{head.diagnostics()}"
    )


_PROBE = "import ray, sys; ray.init(address=sys.argv[1]); print('CONNECTED', ray.nodes())"


def _connect(head: Head, **auth: str) -> subprocess.CompletedProcess[str]:
    """A separate driver process connecting to the cluster with the given Ray auth settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        [sys.executable, "-c", _PROBE, head.gcs_address],
        env={**env, **auth},
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S * 2,
        check=False,
    )


def test_the_cluster_refuses_a_driver_without_its_token(
    cluster: tuple[StandinHandle, Head, Driver, str], tmp_path: Path
) -> None:
    _, head, _, _ = cluster
    no_token = _connect(head)
    assert no_token.returncode != 0 and "CONNECTED" not in no_token.stdout, no_token.stdout
    assert "AuthenticationError" in no_token.stderr, no_token.stderr[-3000:]
    forged = tmp_path / "token"
    forged.write_text("0" * 64)
    forged.chmod(0o600)
    wrong = _connect(head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(forged))
    assert wrong.returncode != 0 and "CONNECTED" not in wrong.stdout, wrong.stdout
    assert "AuthenticationError" in wrong.stderr, wrong.stderr[-3000:]
    good = _connect(head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_path))
    assert good.returncode == 0 and "CONNECTED" in good.stdout, good.stderr[-3000:]


@pytest.mark.timeout(900)
def test_autoscaler_scales_out_drains_and_scales_in(
    cluster: tuple[StandinHandle, Head, Driver, str],
    emulator: EmulatorServer,
    tmp_path: Path,
) -> None:
    standin, head, driver, name = cluster
    hypercore: HypercoreClient = standin.client()
    runtime: dict[str, Any] = {
        "anthropic_base_url": emulator.base_url,
        "anthropic_api_key": emulator.api_key,
        "workspaces": str(tmp_path),
    }
    tmp_path.chmod(0o711)
    spec = {
        "tools": ["bash"],  # a shell tool: isolation vm, a whole VM slot
        "resources": {"cores": 0.5, "memory_mb": 256},
        "system": "You are a test agent.",
    }
    assert cluster_workloads(hypercore, name, "worker") == {}

    # 1. Scale out: the replica needs a VM slot that only a new `cpu` node has.
    placed = driver.call(
        "spawn",
        STEP_TIMEOUT_S + 10,
        agent_id="a1",
        spec=spec,
        runtime=runtime,
        ready_s=STEP_TIMEOUT_S,
    )
    first_node = placed["instance_id"]
    assert first_node.startswith(f"hf-{name}-") and first_node != head.instance_id
    assert placed["replica_resources"]["hyperfleet_vm_slot"] == 1.0
    assert first_node in cluster_workloads(hypercore, name, "worker")
    # The provider finds the node's address in Ray's node table by its instance id.
    address = driver.call(
        "provider_address", CALL_TIMEOUT_S, node_id=first_node, gcs_address=head.gcs_address
    )
    assert address == placed["address"] and address.startswith("127.88.")
    session_id = driver.call("open_session", CALL_TIMEOUT_S, agent_id="a1")
    reply = driver.call(
        "send",
        CALL_TIMEOUT_S + 10,
        agent_id="a1",
        session_id=session_id,
        text="first",
        deadline_s=CALL_TIMEOUT_S,
    )
    assert reply.startswith("You said: first")

    # 2. SIGTERM to the busy node's workload process: Ray drains the node, the replica restarts
    # on another node (the autoscaler adds one), and the session goes on with its transcript.
    pid = node_agent_pid(first_node)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    moved = driver.call(
        "wait_moved",
        STEP_TIMEOUT_S + 10,
        agent_id="a1",
        from_node_id=placed["node_id"],
        deadline_s=STEP_TIMEOUT_S,
    )
    # Another Ray node: a new workload, or the same one respawned by Hypercore and rejoined.
    assert moved["alive"] and moved["node_id"] != placed["node_id"]
    assert moved["instance_id"].startswith(f"hf-{name}-")
    reply = driver.call(
        "send",
        CALL_TIMEOUT_S + 10,
        agent_id="a1",
        session_id=session_id,
        text="second",
        deadline_s=CALL_TIMEOUT_S,
    )
    assert reply.startswith("You said: second")
    assert driver.call("transcript", CALL_TIMEOUT_S, agent_id="a1", session_id=session_id) == [
        "first",
        "second",
    ]

    # 3. Scale in: with the agent deleted, its node idles, is drained and its workload Stopped.
    driver.call("delete", CALL_TIMEOUT_S, agent_id="a1")
    eventually(
        lambda: cluster_workloads(hypercore, name, "worker") == {}, "no worker workload", head
    )
    alive = driver.call("nodes", CALL_TIMEOUT_S)
    assert [n["instance_id"] for n in alive] == [head.instance_id]
    hypercore.close()


@pytest.mark.timeout(600)
def test_a_pool_adds_a_vm_past_its_nodes_slots_and_gives_it_back(
    cluster: tuple[StandinHandle, Head, Driver, str],
    emulator: EmulatorServer,
    tmp_path: Path,
) -> None:
    """The API and its pool controller on the cluster: sessions past one replica's room make
    the pool add a replica, which waits for a VM the autoscaler Spawns through the provider; with
    the sessions closed, the pool drains back to one replica and the autoscaler Stops the VM it
    left idle. Every request answers, the survivors' messages included."""
    standin, head, driver, name = cluster
    hypercore: HypercoreClient = standin.client()
    tmp_path.chmod(0o711)
    # After the test above, whose agent's node goes when it is deleted.
    eventually(lambda: cluster_workloads(hypercore, name, "worker") == {}, "no worker", head)
    api = start_api(driver, tmp_path, emulator.base_url, emulator.api_key, tmp_path)
    load = PoolLoad(api, hypercore, name)
    try:
        _ramp_up_and_down(load, driver, head)
        load.delete_agent()
        assert not load.failures, load.failures
    finally:
        load.close()
        hypercore.close()
        driver.call("serve_down", CALL_TIMEOUT_S)


def _pool_at(load: PoolLoad, states: list[str], vms: int) -> Callable[[], Any]:
    """A check for ``eventually``: the agent's detail once its replicas' states are ``states``
    and the cluster runs ``vms`` worker VMs."""

    def check() -> dict[str, Any] | None:
        detail = load.detail()
        if detail is None or [r["state"] for r in detail["replicas"]] != states:
            return None
        return detail if len(load.vms()) == vms else None

    return check


def _ramp_up_and_down(load: PoolLoad, driver: Driver, head: Head) -> None:
    load.create_agent(vm_agent_spec())  # one replica at least, on a VM of its own
    first = eventually(_pool_at(load, ["ready"], 1), "the first replica on a VM", head)
    [first_vm] = load.vms()

    # Up: a full replica (MAX_SESSIONS) makes the pool want a second one; Ray has no VM slot
    # for it, so the autoscaler Spawns a VM. An open meanwhile finds the first replica full.
    opened = [load.open_session() for _ in range(MAX_SESSIONS)]
    eventually(lambda: (load.detail() or {}).get("desired_replicas") == 2, "desired 2", head)
    opened.append(load.open_session())
    grown = eventually(_pool_at(load, ["ready", "ready"], 2), "a second replica on a VM", head)
    # The fifth open waited for the new replica instead of evicting a session from the full one.
    assert grown["sessions"] == len(opened), grown
    opened.append(load.open_session())  # on the least loaded replica: the new one
    assert None not in opened and not load.failures, load.failures
    assert grown["desired_replicas"] == 2 and grown["scaling_reason"], grown
    instance_of = {n["node_id"]: n["instance_id"] for n in driver.call("nodes", CALL_TIMEOUT_S)}
    vms = load.vms()
    homes = {r["index"]: instance_of[r["node_id"]] for r in grown["replicas"]}
    assert homes[first["replicas"][0]["index"]] == first_vm
    assert set(homes.values()) == set(vms)  # one replica per VM
    [new_index] = [i for i, vm in homes.items() if vm != first_vm]
    on_new = [
        s for s in load.sessions if driver.call("session_replica", 30, session_id=s) == new_index
    ]
    assert opened[-1] in on_new, grown
    assert (load.send(on_new[0], "on the new VM?") or "").startswith("You said"), load.failures

    # Down: two sessions left of 2 x MAX_SESSIONS is under 30 %: one replica drains (its session
    # moves), and its VM, idle, is drained and Stopped by the autoscaler.
    survivors = [load.sessions[0], on_new[0]]
    for session_id in [s for s in load.sessions if s not in survivors]:
        load.close_session(session_id)
    with Talker(load, survivors) as talker:
        shrunk = eventually(_pool_at(load, ["ready"], 1), "one replica and one VM left", head)
    assert shrunk["desired_replicas"] == 1 and talker.answered >= len(survivors), shrunk
    last = shrunk["replicas"][0]["index"]
    assert set(load.vms()) == {homes[last]}  # the VM left is the surviving replica's
    for session_id in survivors:
        assert driver.call("session_replica", 30, session_id=session_id) == last
        assert (load.send(session_id, "and now?") or "").startswith("You said"), load.failures
        assert load.turns(session_id) >= 3  # its earlier turns came along, from the store
