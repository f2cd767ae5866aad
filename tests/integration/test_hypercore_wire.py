"""The Hypercore stand-in's wire format itself, its List cache and its own shutdown: one transport
each, or both at once, on stand-ins of their own (the behaviour over both transports, through the
client, is tests/integration/test_hypercore_conformance.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster.hypercore import HostState, SpawnRequest, UnknownWorkload
from cluster.hypercore.proto import METHODS, VmQueryRequest, VmStopRequest
from cluster.hypercore_standin import StandinHandle, start_standin
from tests.integration.hypercore_fixtures import (
    CATALOG,
    REFRESH_S,
    WAIT_S,
    Standin,
    logs_when,
    marker,
    pids_with_env,
    sleep_request,
    standin_fixture,  # noqa: F401 - imported so that pytest finds the fixture
    wait_for,
)


@pytest.fixture(scope="module")
def wire_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinHandle]:
    handle = start_standin(
        tmp_path_factory.mktemp("hypercore-wire"), refresh_interval_s=REFRESH_S, catalog=CATALOG
    )
    try:
        yield handle
    finally:
        handle.stop()


def http_call(
    handle: StandinHandle, path: str, body: bytes | None = None, method: str = "GET"
) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        f"http://{handle.http_address}{path}", data=body, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_the_http_mirror_speaks_gos_encoding_json(wire_standin: StandinHandle) -> None:
    body = b'{"cores": 1, "memory": 64, "IMAGE_REF": "test.local/sleep:1", "ports": {"8080": 80},'
    body += b' "env": ["K=<v>"], "unknown": true}'
    status, content_type, data = http_call(wire_standin, "/spawn", body, method="POST")
    assert (status, content_type) == (200, "application/json")
    spawned = json.loads(data)["response"]
    assert set(spawned) == {"id", "url"}

    def listed_state() -> dict[str, Any] | None:
        states = json.loads(http_call(wire_standin, "/list")[2])["response"]["states"]
        ids = [w["id"] for w in (states[0] or {}).get("workloads", [])]
        return states[0] if spawned["id"] in ids else None

    state = wait_for(listed_state, "the workload in /list")
    assert set(state) == {"node", "workloads", "beacon"}  # unset policy, empty signature omitted
    assert set(state["node"]) <= {"id", "ip"}
    workload = next(w for w in state["workloads"] if w["id"] == spawned["id"])
    assert workload == {
        "id": spawned["id"],
        "source_request": {
            "cores": 1,
            "memory": 64,
            "image_ref": "test.local/sleep:1",
            "ports": {"8080": 80},
            "env": ["K=<v>"],
        },
    }
    beacon = state["beacon"]
    assert beacon["node_capabilities"] == ["container", "vm"]
    assert isinstance(beacon["timestamp"], int)  # a JSON number, not protobuf-JSON's string
    assert len(base64.b64decode(beacon["node_signature"])) == 32
    raw_list = http_call(wire_standin, "/list")[2]
    assert b"\\u003cv\\u003e" in raw_list  # Go's encoder escapes <, > and &

    # Any method; the host's node comes back, its empty ip omitted.
    status, _, data = http_call(wire_standin, f"/stop?id={spawned['id']}", method="PUT")
    assert status == 200
    assert json.loads(data) == {"response": {"id": state["node"]["id"]}}
    status, _, data = http_call(wire_standin, f"/stop?id={spawned['id']}")
    assert (status, json.loads(data)) == (400, {"error": "no success response received from nodes"})


def test_the_http_mirror_refuses_bad_bodies_with_gos_texts(wire_standin: StandinHandle) -> None:
    cases = [
        (
            b'{"cores": "two"}',
            "json: cannot unmarshal string into Go struct field "
            "VmSpawnRequest.cores of type uint32",
        ),
        (
            b'{"cores": -1}',
            "json: cannot unmarshal number -1 into Go struct field "
            "VmSpawnRequest.cores of type uint32",
        ),
        (b"", "EOF"),
        (b"[1]", "json: cannot unmarshal array into Go value of type cluster.VmSpawnRequest"),
    ]
    for body, text in cases:
        status, _, data = http_call(wire_standin, "/spawn", body, method="POST")
        assert (status, json.loads(data)) == (400, {"error": text})
    status, content_type, data = http_call(wire_standin, "/spawn/")
    assert (status, data) == (404, b"404 page not found\n")
    assert content_type.startswith("text/plain")


def test_grpc_failures_are_status_unknown_with_hypercores_text(
    wire_standin: StandinHandle,
) -> None:
    with grpc.insecure_channel(wire_standin.grpc_address) as channel:
        stop = channel.unary_unary(
            METHODS["Stop"].path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=METHODS["Stop"].response.FromString,
        )
        with pytest.raises(grpc.RpcError) as failed:
            stop(VmStopRequest(id="nope"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        assert failed.value.details() == "no success response received from nodes"
        list_ = channel.unary_unary(
            METHODS["List"].path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=METHODS["List"].response.FromString,
        )
        wait_for(lambda: list_(VmQueryRequest(), timeout=10).states[0].node.id, "a refresh")
        state = list_(VmQueryRequest(), timeout=10).states[0]
        assert list(state.beacon.node_capabilities) == ["container", "vm"]
        assert not state.HasField("policy")
        assert state.state_signature == ""


def test_each_start_is_a_new_host(standin: Standin, wire_standin: StandinHandle) -> None:
    def host_id(handle: StandinHandle) -> str:
        with handle.client("grpc") as c:
            return wait_for(lambda: c.list()[0].node_id, "a refresh")

    first, second = host_id(standin.handle), host_id(wire_standin)
    assert first != second
    assert uuid.UUID(first).version == uuid.UUID(second).version == 4


def test_list_is_a_cache_refreshed_every_interval(tmp_path: Path) -> None:
    interval_s = 3.0
    with start_standin(tmp_path, refresh_interval_s=interval_s, catalog=CATALOG) as handle:
        grpc_client, http_client = handle.client("grpc"), handle.client("http")
        # Before the first refresh the host's own entry is empty, over both transports.
        assert grpc_client.list() == [HostState("", "", ())]
        assert http_client.list() == [HostState("", "", ())]
        spawned = grpc_client.spawn(sleep_request())
        assert grpc_client.list() == [HostState("", "", ())]  # not refreshed yet
        # gRPC Logs goes through the cached List; the mirror's /logs reads the file.
        with pytest.raises(UnknownWorkload, match=f"^workload {spawned.id} does not exist$"):
            grpc_client.logs(spawned.id)
        assert "ready" in wait_for(lambda: http_client.logs(spawned.id), "logs over HTTP")
        state = wait_for(
            lambda: next((s for s in http_client.list() if s.workloads), None),
            "the first refresh",
            timeout_s=3 * interval_s,
        )
        assert [w.id for w in state.workloads] == [spawned.id]
        # The refresh that saw the set of workloads change carries a batch marker.
        assert re.fullmatch(r"[0-9a-f-]{36}_complete", state.node_ip)
        assert grpc_client.list() == [state]
        grpc_client.close()
        http_client.close()


def test_stopping_the_standin_stops_its_workloads(tmp_path: Path) -> None:
    stubborn, graceful = marker(), marker()
    handle = start_standin(tmp_path, refresh_interval_s=REFRESH_S, catalog=CATALOG)
    with handle, handle.client("http") as c:
        ids = [
            c.spawn(SpawnRequest(1, 64, "test.local/stubborn:1", env=(stubborn,))).id,
            c.spawn(SpawnRequest(1, 64, "test.local/graceful:1", env=(graceful,))).id,
        ]
        for workload_id in ids:
            logs_when(c, workload_id, "ready")
    assert handle.process.returncode == 0
    assert not pids_with_env(stubborn) and not pids_with_env(graceful)
    logs = [(handle.state_dir / "logs" / i).read_text() for i in ids]
    assert "got SIGTERM" in logs[0]
    assert "got SIGTERM, exiting" in logs[1]


def _in_process_host(tmp_path: Path, *env: str) -> Any:
    from cluster.hypercore import proto
    from cluster.hypercore_standin.host import Host

    host = Host(CATALOG, tmp_path / "host", "standin.local")
    request = proto.VmSpawnRequest(
        cores=1, memory=64, image_ref="test.local/sleep:1", env=list(env)
    )
    return host, request


def test_a_stop_during_the_respawn_of_an_exited_workload_fails(tmp_path: Path) -> None:
    """Before the fix, refresh awaited the exited entry's cleanup without claiming it, so a Stop
    meanwhile succeeded and the workload still came back under a new id."""
    import asyncio

    from cluster.hypercore_standin.host import HostError

    async def scenario() -> None:
        host, request = _in_process_host(tmp_path)
        try:
            spawned = await host.spawn(request)
            entry = host._workloads[spawned.id]
            for pid in pids_with_env(f"IP={entry.address}"):
                os.kill(pid, 9)
            for _ in range(int(WAIT_S / 0.05)):
                if entry.process.exited:
                    break
                await asyncio.sleep(0.05)
            assert entry.process.exited
            refreshed, stopped = await asyncio.gather(
                host.refresh(), host.stop(spawned.id), return_exceptions=True
            )
            assert refreshed is None
            assert isinstance(stopped, HostError) and "no success response" in stopped.text
        finally:
            await host.shutdown()

    asyncio.run(scenario())


def test_shutdown_stops_a_workload_a_concurrent_spawn_started(tmp_path: Path) -> None:
    import asyncio

    from cluster.hypercore_standin.host import HostError

    mark = marker()

    async def scenario() -> list[str]:
        host, request = _in_process_host(tmp_path, mark)
        spawn = asyncio.create_task(host.spawn(request))
        await asyncio.sleep(0)  # the Spawn is inside its start when shutdown begins
        await host.shutdown()
        with pytest.raises(HostError):
            await spawn
        return [e.address for e in host._workloads.values()]

    assert asyncio.run(scenario()) == []
    assert pids_with_env(mark) == []
