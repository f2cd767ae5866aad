"""The integration tier: one real local Ray cluster per test session and real servers on 127.0.0.1.

Everything here is started as a real process and stopped by its PID (never ``ray stop``, which
would kill other Ray processes on the machine). Ray's GCS gets a free port, never 6379.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.stack import wait_http_ok
from tests.conftest import RAY_TOKEN_PATH, free_port

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


@pytest.fixture(scope="session")
def workspaces_root() -> Iterator[Path]:
    """Session workspaces, where the sandbox's ``nobody`` can reach them (pytest's tmp is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="hyperfleet-ws-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class RedisServer:
    url: str
    port: int


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free port, fsyncing every write (as the store's docs ask)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; the README's test command installs it")
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    process = subprocess.Popen(
        argv,
        stdout=(data / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                _stop(process)
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.1)
    client.close()
    try:
        yield RedisServer(f"redis://127.0.0.1:{port}/0", port)
    finally:
        _stop(process)


@dataclass
class RayCluster:
    address: str
    gcs_port: int
    token_path: Path


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """One real local Ray head for the whole session, with this process connected as a driver.

    Token auth is on, as in production, with the session's token (``tests/conftest.py``).
    The head offers a few VM slots so ``isolation: vm`` replicas can be placed on it.
    """
    import ray

    port = free_port()
    run_dir = tmp_path_factory.mktemp("ray")
    log = run_dir / "ray-head.log"
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=4",
        '--resources={"hyperfleet_vm_slot": 2}',
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
        yield RayCluster(address, port, RAY_TOKEN_PATH)
    finally:
        ray.shutdown()
        _stop(process)
