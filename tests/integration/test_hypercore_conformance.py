"""The Hypercore stand-in's conformance suite: every behaviour of HYPERCORE.md, through the client,
over both transports, against a real stand-in process whose workloads are real processes.

The workloads are small Python scripts (the test catalog below) that print, serve on their own
address, trap SIGTERM, or exit, so each behaviour is observed from the workload's side too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import pytest

from cluster.hypercore import (
    CapacityExceeded,
    HostState,
    HypercoreClient,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    Spawned,
    SpawnRequest,
    Transport,
    UnknownWorkload,
)
from cluster.hypercore.proto import METHODS, VmQueryRequest, VmSpawnRequest, VmStopRequest
from cluster.hypercore.transports import GrpcTransport, HttpTransport
from cluster.hypercore_standin import Image, ImageCatalog, StandinHandle, start_standin

REFRESH_S = 0.2
WAIT_S = 20.0
WORKLOAD_PORT = 9711  # below Ray's worker port range; each workload binds it on its own address

_SERVE = """
import os, socket, sys
print("started A=%s B=%s IP=%s" % (os.environ["A"], os.environ["B"], os.environ["IP"]), flush=True)
print("on stderr", file=sys.stderr, flush=True)
server = socket.create_server((os.environ["IP"], int(os.environ["PORT"])))
while True:
    conn, _ = server.accept()
    conn.sendall(os.environ["IP"].encode())
    conn.close()
"""
_STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM", time.monotonic(), flush=True))
print("ready", flush=True)
while True:
    print("alive", time.monotonic(), flush=True)
    time.sleep(0.25)
"""
_GRACEFUL = """
import signal, sys, time
def leave(*_):
    print("got SIGTERM, exiting", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, leave)
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""
_CRASH_ONCE = """
import os, sys, time
if not os.path.exists(os.environ["FLAG"]):
    open(os.environ["FLAG"], "w").close()
    print("crashing", flush=True)
    sys.exit(3)
print("second life", flush=True)
while True:
    time.sleep(0.1)
"""
_CHATTY = """
import sys, time
for i in range(30000):
    sys.stdout.write("line %06d %s\\n" % (i, "x" * 100))
sys.stdout.write("THE END\\n")
sys.stdout.flush()
while True:
    time.sleep(0.1)
"""
_SLEEP = "import time; print('ready', flush=True); time.sleep(600)"
_ESCAPER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("ready", flush=True)
time.sleep(600)
"""


def _image(script: str, *env: str) -> Image:
    return Image(("{python}", "-c", script), ("IP={workload_ip}", *env))


CATALOG = ImageCatalog(
    {
        "test.local/serve:1": _image(_SERVE, "A=image", "B=image", f"PORT={WORKLOAD_PORT}"),
        "test.local/stubborn:1": _image(_STUBBORN),
        "test.local/graceful:1": _image(_GRACEFUL),
        "test.local/crash-once:1": _image(_CRASH_ONCE),
        "test.local/chatty:1": _image(_CHATTY),
        "test.local/sleep:1": _image(_SLEEP),
        "test.local/escaper:1": _image(_ESCAPER),
    }
)
CAPACITY_CORES = max(os.cpu_count() or 1, 225)

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def pids_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (a unique K=V): the workload's tree."""
    needle = marker.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def marker() -> str:
    return f"HF_MARK={uuid.uuid4().hex}"


def workloads_of(client: HypercoreClient) -> dict[str, SpawnRequest]:
    return {w.id: w.request for state in client.list() for w in state.workloads}


def sleep_request(*env: str, cores: int = 1) -> SpawnRequest:
    return SpawnRequest(cores=cores, memory_mb=64, image_ref="test.local/sleep:1", env=env)


@dataclass(frozen=True)
class Standin:
    handle: StandinHandle
    transport: Literal["grpc", "http"]

    def logs_after_stop(self, workload_id: str) -> str:
        """The mirror's /logs reads the workload's log file, which outlives the workload."""
        with self.handle.client("http") as http:
            return http.logs(workload_id)


@pytest.fixture(scope="module", params=["grpc", "http"])
def standin(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Standin]:
    """One stand-in per transport, refreshing its List cache every REFRESH_S."""
    transport = request.param
    log_dir = tmp_path_factory.mktemp(f"hypercore-{transport}")
    handle = start_standin(log_dir, refresh_interval_s=REFRESH_S, catalog=CATALOG)
    try:
        yield Standin(handle, transport)
    finally:
        handle.stop()


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


def logs_when(client: HypercoreClient, workload_id: str, text: str) -> str:
    def probe() -> str | None:
        try:
            logs = client.logs(workload_id)
        except UnknownWorkload:  # over gRPC, until the cached List has the workload
            return None
        return logs if text in logs else None

    return wait_for(probe, f"{text!r} in the logs of {workload_id}")


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


# The wire format itself, the List cache and the stand-in's own shutdown: one transport each, or
# both at once, on stand-ins of their own.


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
