"""The integration tier: one real local Ray cluster per test session and real servers on 127.0.0.1.

Everything here is started as a real process (``cluster.cli.servers``) and stopped by its PID
(never ``ray stop``, which would kill other Ray processes on the machine). Ray's GCS gets a free
port, never 6379.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cluster.cli.servers import start_emulator as _start_emulator_process
from cluster.cli.servers import start_ray_head, start_redis
from hyperfleet.names import NAMESPACE, POOL_ACTOR_NAME
from hyperfleet.processes import free_port, stop, tail
from tests.conftest import RAY_TOKEN_PATH

if TYPE_CHECKING:
    import anthropic

    from actors import SessionHost

READY_TIMEOUT_S = 60.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


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
    process = _start_emulator_process(port, key, log, *flags)
    return process, EmulatorServer(f"http://127.0.0.1:{port}", key, log)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorServer]:
    """The Anthropic emulator, zero latency, fast retry-after, shared by the session."""
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    process, server = start_emulator(log, "--retry-after-ms", "10")
    try:
        yield server
    finally:
        stop(process)


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
    port = free_port()
    process = start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield RedisServer(f"redis://127.0.0.1:{port}/0", port)
    finally:
        stop(process)


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
    log = tmp_path_factory.mktemp("ray") / "ray-head.log"
    # Replicas are I/O-bound: declare more CPUs than the machine has, as the local stack does.
    process = start_ray_head(port, log, num_cpus=16, resources={"hyperfleet_vm_slot": 4})
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            try:
                ray.init(address=address, namespace="hyperfleet", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"Ray head did not start:\n{tail(log)}") from None
                time.sleep(0.5)
        yield RayCluster(address, port, RAY_TOKEN_PATH)
    finally:
        ray.shutdown()
        stop(process)


@dataclass
class ApiServer:
    base_url: str
    admin_key: str
    data_dir: Path
    config: dict[str, Any]


@pytest.fixture(scope="session")
def api_server(
    ray_cluster: RayCluster,
    emulator: EmulatorServer,
    workspaces_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    """The Serve app with two ingress replicas, its control store and the session store."""
    import ray
    from ray import serve

    from actors import start_store_actor
    from serve_app import APP_NAME, build, start_control_actor

    data = tmp_path_factory.mktemp("api")
    store = start_store_actor(data / "sessions.db")
    control = start_control_actor(data / "control.db")
    ray.get([store.ping.remote(), control.ping.remote()], timeout=60)
    admin_id = "usr_admin"
    ray.get(control.create_user.remote(admin_id, "admin", {}, True), timeout=30)
    admin_key = ray.get(control.issue_key.remote(admin_id), timeout=30).api_key
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {
        "runtime": {
            "anthropic_base_url": emulator.base_url,
            "anthropic_api_key": emulator.api_key,
            "workspaces": str(workspaces_root),
            # The outbox sweep's test (test_metering_api.py) waits seconds, not a minute.
            "sweep_interval_s": 1.0,
            "usage_outbox_grace_s": 2.0,
        },
        "ip_requests_per_minute": 100_000,
        # No warm pool (no autoscaler runs here), and pools observed twice a second, so the
        # scaling test's short cooldowns are seen.
        "pool": {
            "warm_floor": 0,
            "warm_spare": 0,
            "tick_s": 0.5,
            "min_scale_down_cooldown_s": 1,
            # A paused replica is replaced after seconds (test_pool_scaling.py), not half a
            # minute; a killed one restarts well within it.
            "replica_unresponsive_s": 8,
        },
    }
    serve.run(build(config, num_replicas=2), name=APP_NAME, route_prefix="/")
    try:
        yield ApiServer(f"http://127.0.0.1:{port}", admin_key, data, config)
    finally:
        serve.shutdown()
        with contextlib.suppress(ValueError):  # the ingress started it
            ray.kill(ray.get_actor(POOL_ACTOR_NAME, namespace=NAMESPACE), no_restart=True)
        ray.kill(control, no_restart=True)


HostFactory = Callable[..., "SessionHost"]


@pytest.fixture
async def make_host(
    request: pytest.FixtureRequest,
    emulator: EmulatorServer,
    tmp_path: Path,
    workspaces_root: Path,
) -> AsyncIterator[HostFactory]:
    """Builds ``SessionHost``s without Ray, on one SQLite store, talking to the emulator (one
    host per replica: two on the store are two replicas of an agent)."""
    from actors import AgentSpec, RuntimeConfig, SqliteSessionStore
    from actors.actor import build_host, model_client

    transport = getattr(request, "param", "aiohttp")
    clients: list[anthropic.AsyncAnthropic] = []
    store = SqliteSessionStore(tmp_path / "sessions.db")
    runtime = RuntimeConfig(workspaces=str(workspaces_root))

    def make(
        headers: dict[str, str] | None = None, agent_id: str = "a1", **spec_fields: Any
    ) -> SessionHost:
        spec = AgentSpec(
            **{"tools": ("bash", "read_file", "write_file", "list_files"), **spec_fields}
        )
        client = model_client(
            emulator.api_key,
            emulator.base_url,
            transport=transport,
            max_retries=2,
            default_headers={"x-emulator-retry-after-ms": "10", **(headers or {})},
        )
        clients.append(client)
        return build_host(agent_id, spec, runtime, client, store=store, stream_backoff_s=0.01)

    yield make
    for client in clients:
        await client.close()
    store.close()
