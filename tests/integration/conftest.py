"""The integration tier: one real local Ray cluster per test session and real servers on 127.0.0.1.

Everything here is started as a real process and stopped by its PID (never ``ray stop``, which
would kill other Ray processes on the machine). Ray's GCS gets a free port, never 6379.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.stack import wait_http_ok
from tests.conftest import free_port

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 45.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def _stop(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@dataclass
class EmulatorServer:
    base_url: str
    api_key: str
    log: Path

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + "/_emulator/stats", timeout=5) as r:  # noqa: S310
            data: dict[str, Any] = json.loads(r.read())
            return data


def start_emulator(log: Path, *flags: str) -> tuple[subprocess.Popen[bytes], EmulatorServer]:
    port = free_port()
    key = "sk-ant-test-" + os.urandom(6).hex()
    argv = [sys.executable, "-m", "cluster.cli", "emulator", "--port", str(port), "--api-key", key]
    process = subprocess.Popen(
        [*argv, *flags],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = EmulatorServer(f"http://127.0.0.1:{port}", key, log)
    if not wait_http_ok(server.base_url + "/_emulator/stats", READY_TIMEOUT_S):
        _stop(process)
        raise RuntimeError(f"emulator did not start:\n{log.read_text()}")
    return process, server


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorServer]:
    """The Anthropic emulator, zero latency, fast retry-after, shared by the session."""
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    process, server = start_emulator(log, "--retry-after-ms", "10")
    try:
        yield server
    finally:
        _stop(process)


@dataclass
class RayCluster:
    address: str
    gcs_port: int


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """One real local Ray head for the whole session, with this process connected as a driver."""
    import ray

    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "ray-head.log"
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--block",
    ]
    process = subprocess.Popen(
        argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            try:
                ray.init(address=address, namespace="hyperfleet", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"Ray head did not start:\n{log.read_text()}") from None
                time.sleep(0.5)
        yield RayCluster(address, port)
    finally:
        ray.shutdown()
        _stop(process)
