"""The Hypercore stand-in's conformance suite: every behaviour of HYPERCORE.md, through the client,
over both transports, against a real stand-in process whose workloads are real processes.

The workloads are small Python scripts (the test catalog in hypercore_fixtures.py) that print, serve
on their own address, trap SIGTERM, or exit, so each behaviour is observed from the workload's side
too. The wire format itself, the List cache and the stand-in's own shutdown are
test_hypercore_wire.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.hypercore import (
    CapacityExceeded,
    HypercoreClient,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    Spawned,
    SpawnRequest,
    Transport,
    UnknownWorkload,
)
from cluster.hypercore.proto import VmSpawnRequest
from cluster.hypercore.transports import GrpcTransport, HttpTransport
from tests.integration.hypercore_fixtures import (
    REFRESH_S,
    WORKLOAD_PORT,
    Standin,
    logs_when,
    marker,
    pids_with_env,
    sleep_request,
    standin_fixture,  # noqa: F401 - imported so that pytest finds the fixture
    wait_for,
)

CAPACITY_CORES = max(os.cpu_count() or 1, 225)


def workloads_of(client: HypercoreClient) -> dict[str, SpawnRequest]:
    return {w.id: w.request for state in client.list() for w in state.workloads}


def running_ids(standin: Standin) -> set[str]:
    """Every workload the stand-in runs now, from its state directory (not its cached List)."""
    return {p.name for p in (standin.handle.state_dir / "workloads").iterdir()}


@pytest.fixture
def client(standin: Standin) -> Iterator[HypercoreClient]:
    """A client over the module's transport; workloads a test leaves running are stopped."""
    before = running_ids(standin)
    with standin.handle.client(standin.transport) as c:
        yield c
        for workload_id in running_ids(standin) - before:
            with contextlib.suppress(UnknownWorkload):
                c.stop(workload_id)


def listed(client: HypercoreClient, workload_id: str) -> SpawnRequest:
    return wait_for(lambda: workloads_of(client).get(workload_id), f"{workload_id} in List")


def test_spawn_returns_once_the_workload_runs(client: HypercoreClient) -> None:
    mark = marker()
    spawned = client.spawn(sleep_request(mark))
    # Synchronous: the process exists as soon as Spawn returns.
    assert pids_with_env(mark)
    assert uuid.UUID(spawned.id).version == 4
    assert spawned.url == f"{spawned.id}.example.com"


def test_env_is_the_images_then_the_requests_and_list_echoes_it(client: HypercoreClient) -> None:
    env = ("B=request", "C=x=y z", "D=")
    request = SpawnRequest(
        cores=1, memory_mb=128, image_ref="test.local/serve:1", ports={8080: 80}, env=env
    )
    spawned = client.spawn(request)
    logs = logs_when(client, spawned.id, "on stderr")
    assert "started A=image B=request" in logs  # stdout and stderr, combined
    assert listed(client, spawned.id) == request  # env exactly, in order; the port map too


def test_each_workload_has_its_own_address(client: HypercoreClient) -> None:
    request = SpawnRequest(cores=1, memory_mb=64, image_ref="test.local/serve:1", env=("B=b",))
    addresses = []
    for spawned in (client.spawn(request), client.spawn(request)):
        logs = logs_when(client, spawned.id, "started")
        addresses.append(logs.split("IP=", 1)[1].split()[0])
    assert addresses[0] != addresses[1]
    for ip in addresses:
        assert ip.startswith("127.88.")
        # Both bind the same port, each on its own address, and answer with that address.
        conn = wait_for(lambda ip=ip: _connect(ip), f"{ip}:{WORKLOAD_PORT} to listen")
        with conn:
            assert conn.recv(100).decode() == ip


def _connect(ip: str) -> socket.socket | None:
    try:
        return socket.create_connection((ip, WORKLOAD_PORT), timeout=5)
    except ConnectionRefusedError:
        return None


def test_dry_run_answers_empty_and_starts_nothing(client: HypercoreClient) -> None:
    mark = marker()
    request = SpawnRequest(
        cores=1, memory_mb=64, image_ref="test.local/sleep:1", env=(mark,), dry_run=True
    )
    assert client.spawn(request) == Spawned(id="", url="")
    time.sleep(3 * REFRESH_S)
    assert not pids_with_env(mark)
    assert all(r.env != (mark,) for r in workloads_of(client).values())


def test_a_port_above_65535_is_refused(client: HypercoreClient, standin: Standin) -> None:
    request = SpawnRequest(cores=1, memory_mb=64, image_ref="test.local/sleep:1", ports={80: 70000})
    with pytest.raises(InvalidSpawnRequest, match="got invalid port 70000 greater than 65535"):
        client.spawn(request)
    # On the wire (past the client's own check) Hypercore's host ignores the request: no host
    # answers, and nothing starts.
    handle = standin.handle
    raw: Transport = (
        GrpcTransport(handle.grpc_address)
        if standin.transport == "grpc"
        else HttpTransport(handle.http_address)
    )
    mark = marker()
    message = VmSpawnRequest(
        cores=1, memory=64, image_ref="test.local/sleep:1", ports={80: 70000}, env=[mark]
    )
    try:
        with pytest.raises(HypercoreUnavailable, match=r"^no response received from nodes$"):
            raw.call("Spawn", message, 10.0)
    finally:
        raw.close()
    assert not pids_with_env(mark)


def test_cores_beyond_capacity_are_refused_until_some_stop(client: HypercoreClient) -> None:
    big = client.spawn(sleep_request(cores=CAPACITY_CORES - 5))
    cpus = os.cpu_count()
    text = (
        "node returned failure response: cannot spawn container: have capacity for "
        f"{cpus} vCPUs, already in use: {CAPACITY_CORES - 5}, requested: 6"
    )
    with pytest.raises(CapacityExceeded) as refused:
        client.spawn(sleep_request(cores=6))
    assert refused.value.message == text
    assert refused.value.retryable
    client.stop(big.id)
    client.spawn(sleep_request(cores=6))


def test_an_unknown_image_fails_like_a_failed_pull(client: HypercoreClient) -> None:
    request = SpawnRequest(cores=1, memory_mb=64, image_ref="docker.io/library/nope:latest")
    with pytest.raises(InvalidSpawnRequest) as refused:
        client.spawn(request)
    assert refused.value.message.startswith(
        "node returned failure response: failed to spawn container: "
        "failed to pull image docker.io/library/nope:latest: "
    )


def test_list_shows_one_host_with_its_running_workloads(client: HypercoreClient) -> None:
    spawned = client.spawn(sleep_request("K=v"))
    listed(client, spawned.id)
    states = client.list()
    assert len(states) == 1
    host = states[0]
    assert uuid.UUID(host.node_id)  # the host's name: a UUID new at each start
    assert host.node_ip == "" or host.node_ip.endswith("_complete")
    node = client.stop(spawned.id)
    assert (node.id, node.ip) == (host.node_id, "")
    wait_for(lambda: spawned.id not in workloads_of(client), "the stopped workload to leave List")
    assert [s.node_id for s in client.list()] == [host.node_id]


def test_stop_waits_5_s_after_sigterm_then_kills(client: HypercoreClient, standin: Standin) -> None:
    mark = marker()
    request = SpawnRequest(cores=1, memory_mb=64, image_ref="test.local/stubborn:1", env=(mark,))
    spawned = client.spawn(request)
    logs_when(client, spawned.id, "ready")
    client.stop(spawned.id)
    assert not pids_with_env(mark)  # gone when Stop returns
    with pytest.raises(UnknownWorkload, match=r"^no success response received from nodes$"):
        client.stop(spawned.id)
    lines = standin.logs_after_stop(spawned.id).splitlines()
    term_at = next(float(line.split()[-1]) for line in lines if line.startswith("got SIGTERM"))
    last_alive = max(float(line.split()[1]) for line in lines if line.startswith("alive"))
    # It kept running through the grace period (it ignores SIGTERM), then it was killed.
    assert 3.5 <= last_alive - term_at <= 8.0


def test_stop_kills_children_that_left_the_workloads_session(client: HypercoreClient) -> None:
    # A container's whole tree dies with it: a child in its own session (and holding the output
    # pipe) must neither survive Stop nor keep Stop from returning.
    mark = marker()
    request = SpawnRequest(cores=1, memory_mb=64, image_ref="test.local/escaper:1", env=(mark,))
    spawned = client.spawn(request)
    logs_when(client, spawned.id, "ready")
    assert len(pids_with_env(mark)) == 2
    client.stop(spawned.id, timeout_s=30)
    assert not pids_with_env(mark)


def test_stop_of_a_graceful_workload_lets_it_exit(
    client: HypercoreClient, standin: Standin
) -> None:
    mark = marker()
    request = SpawnRequest(cores=1, memory_mb=64, image_ref="test.local/graceful:1", env=(mark,))
    spawned = client.spawn(request)
    logs_when(client, spawned.id, "ready")
    client.stop(spawned.id)
    assert not pids_with_env(mark)
    assert "got SIGTERM, exiting" in standin.logs_after_stop(spawned.id)
    if standin.transport == "grpc":
        # gRPC Logs looks the workload up in the cached List, which soon forgets it.
        wait_for(lambda: spawned.id not in workloads_of(client), "the workload to leave List")
        with pytest.raises(UnknownWorkload, match=f"^workload {spawned.id} does not exist$"):
            client.logs(spawned.id)


def test_stop_of_an_unknown_id_fails_with_hypercores_text(client: HypercoreClient) -> None:
    with pytest.raises(UnknownWorkload, match=r"^no success response received from nodes$"):
        client.stop(str(uuid.uuid4()))


def test_a_workload_that_exits_is_spawned_again_under_a_new_id(
    client: HypercoreClient, standin: Standin, tmp_path: Path
) -> None:
    flag = tmp_path / "crashed-once"
    request = SpawnRequest(
        cores=1, memory_mb=64, image_ref="test.local/crash-once:1", env=(f"FLAG={flag}",)
    )
    first = client.spawn(request)

    def respawned() -> str | None:
        ids = [i for i, r in workloads_of(client).items() if r == request and i != first.id]
        return ids[0] if ids else None

    second = wait_for(respawned, "the respawned workload in List")
    assert uuid.UUID(second).version == 4
    assert first.id not in workloads_of(client)
    assert "second life" in logs_when(client, second, "second life")
    assert "crashing" in standin.logs_after_stop(first.id)


def test_logs_keep_the_last_mebibyte(client: HypercoreClient) -> None:
    spawned = client.spawn(SpawnRequest(cores=1, memory_mb=64, image_ref="test.local/chatty:1"))
    logs = logs_when(client, spawned.id, "THE END")
    assert logs.endswith("THE END\n")
    assert len(logs.encode()) <= 1024 * 1024
    assert "line 029999" in logs and "line 000000" not in logs


def test_logs_of_an_unknown_id(client: HypercoreClient) -> None:
    with pytest.raises(UnknownWorkload):
        client.logs(str(uuid.uuid4()))


def test_one_client_is_safe_to_share_across_threads(client: HypercoreClient) -> None:
    results: list[Spawned] = []
    errors: list[BaseException] = []

    def spawn() -> None:
        try:
            results.append(client.spawn(sleep_request()))
            client.list()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=spawn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len({s.id for s in results}) == 4
    for s in results:
        listed(client, s.id)
