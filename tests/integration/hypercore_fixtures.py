"""What the Hypercore stand-in's suites share: the test image catalog, the module's stand-in per
transport, and the waits and probes that observe a workload from its own side.

The workloads are small Python scripts (the catalog below) that print, serve on their own address,
trap SIGTERM, or exit. The ``standin`` fixture lives in this plain module, so a test module that
uses it imports it (as ``standin_fixture``; pytest finds it under its fixture name).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import pytest

from cluster.hypercore import HypercoreClient, SpawnRequest, UnknownWorkload
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


@pytest.fixture(name="standin", scope="module", params=["grpc", "http"])
def standin_fixture(
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


def logs_when(client: HypercoreClient, workload_id: str, text: str) -> str:
    def probe() -> str | None:
        try:
            logs = client.logs(workload_id)
        except UnknownWorkload:  # over gRPC, until the cached List has the workload
            return None
        return logs if text in logs else None

    return wait_for(probe, f"{text!r} in the logs of {workload_id}")
