"""``HypercoreNodeProvider`` against a real Hypercore stand-in: what Ray's autoscaler relies on.

The workloads run a trivial image (a Python process that sleeps), so no Ray node starts: what is
checked is the provider's own behaviour through Hypercore's API, including a fresh provider
instance seeing the same nodes and tags, and a workload respawned by Hypercore keeping its node id.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_LAUNCH_REQUEST,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from autoscaling import (
    HeadStartError,
    HypercoreNodeProvider,
    NodeLaunchError,
    NoRemoteExecutionError,
    ProviderConfigError,
)
from cluster.hypercore import (
    HypercoreClient,
    HypercoreUnavailable,
    SpawnRequest,
)
from cluster.hypercore_standin import StandinHandle, start_standin
from cluster.join.tickets import TicketBook
from hyperfleet.processes import free_port

from .prometheus_server import (  # the fixture is `prometheus`
    StartPrometheus,
    Target,
    panels_naming,
    prometheus_fixture,  # noqa: F401
)
from .waiting import wait_until

SLEEP_IMAGE = "test.local/sleep:latest"
FAKE_RAY_IMAGE = "test.local/fake-ray:latest"
CATALOG = {
    "images": {
        SLEEP_IMAGE: {"argv": ["{python}", "-c", "import time; time.sleep(3600)"]},
        FAKE_RAY_IMAGE: {
            "argv": [
                "{python}",
                "-c",
                "import time; print('Ray runtime started.', flush=True); time.sleep(3600)",
            ]
        },
    }
}
NODE_CONFIG = {"cores": 1, "memory_mb": 256}
# The stand-in refreshes its cached List every second here; Hypercore's own interval is ~5 s.
REFRESH_INTERVAL_S = 1.0


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinHandle]:
    root = tmp_path_factory.mktemp("standin")
    catalog = root / "catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    handle = start_standin(root, refresh_interval_s=REFRESH_INTERVAL_S, catalog=catalog)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def hypercore(standin: StandinHandle) -> Iterator[HypercoreClient]:
    client = standin.client()
    yield client
    client.close()


@pytest.fixture
def config(standin: StandinHandle, tmp_path: Path) -> dict[str, Any]:
    return {
        "type": "external",
        "module": "autoscaling.provider.HypercoreNodeProvider",
        "hypercore_address": standin.grpc_address,
        "default_image": SLEEP_IMAGE,
        "state_dir": str(tmp_path / "provider"),
        "disable_node_updaters": True,
        "list_cache_ttl_s": 0.2,
        "hypercore_refresh_interval_s": REFRESH_INTERVAL_S,
        # No metrics server on the fixed default port from a test process; the metrics test
        # picks a free one.
        "metrics_port": 0,
    }


@pytest.fixture(autouse=True)
def join_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the head's node agent gives its autoscaler: without it no worker is launched."""
    monkeypatch.setenv("HYPERFLEET_JOIN_DB", str(tmp_path / "join.db"))
    monkeypatch.setenv("HYPERFLEET_JOIN_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("HYPERFLEET_HEAD_ADDRESS", f"127.0.0.1:{free_port()}")


@pytest.fixture
def cluster_name() -> str:
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def make_provider(
    config: dict[str, Any], cluster_name: str
) -> Iterator[Callable[..., HypercoreNodeProvider]]:
    """Builds providers like Ray does; every node any of them knows is terminated afterwards."""
    made: list[HypercoreNodeProvider] = []

    def make(**overrides: Any) -> HypercoreNodeProvider:
        provider = HypercoreNodeProvider({**config, **overrides}, cluster_name)
        made.append(provider)
        return provider

    yield make
    if made:
        made[0].terminate_nodes(made[0].non_terminated_nodes({}))


def worker_tags(request_id: str = "r1", node_type: str = "cpu") -> dict[str, str]:
    return {
        TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
        TAG_RAY_USER_NODE_TYPE: node_type,
        TAG_RAY_NODE_STATUS: "uninitialized",
        TAG_RAY_LAUNCH_REQUEST: request_id,
    }


def create_workers(
    provider: HypercoreNodeProvider, count: int, tags: dict[str, str] | None = None
) -> list[str]:
    created = provider.create_node_with_resources_and_labels(
        dict(NODE_CONFIG),
        tags or worker_tags(),
        count,
        {"CPU": 1, "hyperfleet_vm_slot": 1},
        {"hyperfleet/pool": "cpu"},
    )
    return sorted(created)


def listed(client: HypercoreClient, cluster_name: str) -> dict[str, list[str]]:
    """Node id -> workload ids, as Hypercore's List shows them right now."""
    nodes: dict[str, list[str]] = {}
    for host in client.list():
        for workload in host.workloads:
            env = dict(e.split("=", 1) for e in workload.request.env)
            if env.get("HYPERFLEET_CLUSTER") == cluster_name:
                nodes.setdefault(env["HYPERFLEET_INSTANCE_ID"], []).append(workload.id)
    return nodes


def workload_pids(node_id: str) -> list[int]:
    """The processes started with the node's env (the workload's process tree)."""
    marker = f"HYPERFLEET_INSTANCE_ID={node_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def test_create_two_and_list_them_by_tags(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
) -> None:
    provider = make_provider()
    ids = create_workers(provider, 2)
    assert len(ids) == 2 and all(i.startswith(f"hf-{cluster_name}-") for i in ids)
    # Seen at once by the instance that created them, before Hypercore's List catches up.
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER}) == ids
    assert provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "gpu"}) == []
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD}) == []
    assert all(provider.is_running(i) and not provider.is_terminated(i) for i in ids)
    # Hypercore's List carries them, each with its identity and tags in env, no secret.
    wait_until(lambda: len(listed(hypercore, cluster_name)) == 2, "both workloads in List")
    assert sorted(listed(hypercore, cluster_name)) == ids
    for host in hypercore.list():
        for workload in host.workloads:
            env = dict(e.split("=", 1) for e in workload.request.env)
            if env.get("HYPERFLEET_CLUSTER") != cluster_name:
                continue
            assert json.loads(env["HYPERFLEET_TAGS"]) == worker_tags()
            assert json.loads(env["HYPERFLEET_RESOURCES"]) == {"hyperfleet_vm_slot": 1}
            assert env["HYPERFLEET_NUM_CPUS"] == "1"
            assert workload.request.image_ref == SLEEP_IMAGE
            assert not any("TOKEN" in key for key in env if key != "HYPERFLEET_JOIN_TICKET")
    # Another cluster's provider on the same Hypercore sees none of them.
    other = HypercoreNodeProvider(provider.provider_config, cluster_name + "-other")
    assert other.non_terminated_nodes({}) == []


def test_nodes_and_tags_survive_a_fresh_instance(
    make_provider: Callable[..., HypercoreNodeProvider], cluster_name: str
) -> None:
    first = make_provider()
    [node_id] = create_workers(first, 1, worker_tags("req-7"))
    first.set_node_tags(node_id, {TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE})
    fresh = make_provider()  # what the head's autoscaler, or the next `ray` command, builds
    assert wait_until(lambda: fresh.non_terminated_nodes({}) == [node_id], "the fresh instance")
    tags = fresh.node_tags(node_id)
    assert tags[TAG_RAY_LAUNCH_REQUEST] == "req-7"
    assert tags[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE
    assert fresh.non_terminated_nodes({TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}) == [node_id]
    assert fresh.non_terminated_nodes({TAG_RAY_NODE_STATUS: "uninitialized"}) == []


@pytest.mark.timeout(180)
def test_concurrent_creates_and_terminates(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
) -> None:
    provider = make_provider()
    stop_reading = threading.Event()
    read_errors: list[BaseException] = []

    def read_all_the_time() -> None:
        while not stop_reading.is_set():
            try:
                for node_id in provider.non_terminated_nodes({}):
                    provider.node_tags(node_id)
                    provider.is_running(node_id)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                read_errors.append(e)
                return

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            batches = list(
                pool.map(lambda i: create_workers(provider, 1, worker_tags(f"r{i}")), range(6))
            )
            ids = sorted(i for batch in batches for i in batch)
            assert len(set(ids)) == 6
            assert provider.non_terminated_nodes({}) == ids
            list(pool.map(provider.terminate_node, ids[:4]))
        assert provider.non_terminated_nodes({}) == ids[4:]
    finally:
        stop_reading.set()
        reader.join(30)
    assert read_errors == []
    fresh = make_provider()
    wait_until(lambda: sorted(listed(hypercore, cluster_name)) == ids[4:], "List to show 2 nodes")
    assert fresh.non_terminated_nodes({}) == ids[4:]


def test_terminate_is_idempotent_and_revokes_the_ticket(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    join_db = tmp_path / "join.db"
    monkeypatch.setenv("HYPERFLEET_JOIN_DB", str(join_db))
    monkeypatch.setenv("HYPERFLEET_JOIN_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("HYPERFLEET_HEAD_ADDRESS", f"127.0.0.1:{free_port()}")
    provider = make_provider()
    [node_id] = create_workers(provider, 1)
    env = wait_until(
        lambda: next(
            (
                dict(e.split("=", 1) for e in w.request.env)
                for h in hypercore.list()
                for w in h.workloads
                if f"HYPERFLEET_INSTANCE_ID={node_id}" in w.request.env
            ),
            None,
        ),
        "the workload in List",
    )
    book = TicketBook(join_db)
    ticket = book.lookup(env["HYPERFLEET_JOIN_TICKET"])
    assert ticket is not None and ticket.instance_id == node_id
    provider.terminate_node(node_id)
    provider.terminate_node(node_id)
    make_provider().terminate_node(node_id)  # a fresh instance, with List still stale
    provider.terminate_nodes([node_id, f"hf-{cluster_name}-neverexisted"])
    assert provider.non_terminated_nodes({}) == []
    assert provider.is_terminated(node_id)
    revoked = book.lookup(env["HYPERFLEET_JOIN_TICKET"])
    assert revoked is not None and revoked.revoked_at is not None
    assert wait_until(lambda: listed(hypercore, cluster_name) == {}, "List without the node")


@pytest.mark.timeout(180)
def test_a_respawned_workload_keeps_its_node_id(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
) -> None:
    provider = make_provider()
    [node_id] = create_workers(provider, 1, worker_tags("req-respawn"))
    [first_workload] = wait_until(lambda: listed(hypercore, cluster_name).get(node_id), "List")
    pids = wait_until(lambda: workload_pids(node_id), "the workload's process")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    # Hypercore starts the same request again under a new workload id.
    def respawned() -> list[str] | None:
        workloads = listed(hypercore, cluster_name).get(node_id)
        return workloads if workloads and workloads != [first_workload] else None

    [second_workload] = wait_until(respawned, "the respawned workload")
    assert second_workload != first_workload
    fresh = make_provider()
    assert fresh.non_terminated_nodes({}) == [node_id]
    assert fresh.node_tags(node_id)[TAG_RAY_LAUNCH_REQUEST] == "req-respawn"
    # Terminating the node stops the workload it has now, for good.
    fresh.terminate_node(node_id)
    assert wait_until(lambda: listed(hypercore, cluster_name) == {}, "List without the node")
    assert wait_until(lambda: not workload_pids(node_id), "the workload's processes to exit")


def test_config_errors_are_clear(
    make_provider: Callable[..., HypercoreNodeProvider], cluster_name: str
) -> None:
    with pytest.raises(ProviderConfigError, match="transport"):
        make_provider(transport="ssh")
    with pytest.raises(ProviderConfigError, match="disable_node_updaters"):
        make_provider(disable_node_updaters=False)
    provider = make_provider()
    with pytest.raises(ProviderConfigError, match=r"'cpu'.*memory_mb"):
        provider.create_node_with_resources_and_labels({"cores": 1}, worker_tags(), 1, {}, {})
    with pytest.raises(NodeLaunchError, match="65535") as bad_port:
        provider.create_node_with_resources_and_labels(
            {**NODE_CONFIG, "ports": {70000: 80}}, worker_tags(), 1, {}, {}
        )
    assert not bad_port.value.retryable
    assert provider.non_terminated_nodes({}) == []
    # No Hypercore at the address: raised (the autoscaler retries on its next tick), never
    # swallowed into an empty node list.
    gone = make_provider(hypercore_address=f"127.0.0.1:{free_port()}", call_timeout_s=2)
    with pytest.raises(HypercoreUnavailable):
        gone.non_terminated_nodes({})
    with pytest.raises(NodeLaunchError) as unavailable:
        create_workers(gone, 1)
    assert unavailable.value.retryable


def test_command_runner_runs_nothing_and_waits_for_ray(
    make_provider: Callable[..., HypercoreNodeProvider],
) -> None:
    provider = make_provider(head_start_timeout_s=3)
    head_tags = {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: "head"}
    [sleeper] = create_workers(provider, 1)
    [head] = provider.create_node_with_resources_and_labels(
        {**NODE_CONFIG, "image": FAKE_RAY_IMAGE}, head_tags, 1, {"CPU": 1}, {}
    )
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD}) == [head]
    runner = provider.get_command_runner("", head, {}, provider.cluster_name, None, True)  # type: ignore[arg-type]
    assert runner.run("uptime") == ""
    runner.run_rsync_up("/tmp/ray-bootstrap-x", "~/ray_bootstrap_config.yaml")
    assert runner.run("export RAY_CLOUD_INSTANCE_ID=x; ray start --head --block") == ""
    with pytest.raises(NoRemoteExecutionError, match="no remote execution"):
        runner.run("pip install something")
    with pytest.raises(NoRemoteExecutionError, match="file_mounts"):
        runner.run_rsync_up("/etc/hosts", "/etc/hosts")
    silent = provider.get_command_runner("", sleeper, {}, provider.cluster_name, None, True)  # type: ignore[arg-type]
    with pytest.raises(HeadStartError, match="did not start"):
        silent.run("ray start --head")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The provider's metrics as Prometheus reads them, from its port on the head's address
    (HYPERFLEET_HEAD_ADDRESS is 127.0.0.1:... here)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_hypercore_calls_and_vms_are_served_as_metrics(
    make_provider: Callable[..., HypercoreNodeProvider],
    prometheus: StartPrometheus,
) -> None:
    port = free_port()
    provider = make_provider(metrics_port=port)
    make_provider(metrics_port=port)  # Ray builds more than one: no second bind, no error
    # Scraping from before the traffic on (its first scrape is seconds after its start).
    prom = prometheus([Target(f"127.0.0.1:{port}")])

    def calls(samples: dict[Any, float], method: str, outcome: str = "ok") -> float:
        key = (
            "hyperfleet_hypercore_requests_total",
            frozenset({("method", method), ("outcome", outcome)}),
        )
        return samples.get(key, 0.0)

    def vms(samples: dict[Any, float], state: str) -> float:
        key = ("hyperfleet_vms", frozenset({("node_type", "metered"), ("state", state)}))
        return samples.get(key, 0.0)

    before = scrape(port)
    ids = create_workers(provider, 2, worker_tags(node_type="metered"))
    after_spawn = scrape(port)
    assert calls(after_spawn, "Spawn") == calls(before, "Spawn") + 2
    timed = (
        "hyperfleet_hypercore_request_duration_seconds_count",
        frozenset({("method", "Spawn")}),
    )
    assert after_spawn[timed] == before.get(timed, 0.0) + 2
    # Spawned, and not in Hypercore's List yet (it refreshes every REFRESH_INTERVAL_S).
    assert vms(after_spawn, "spawned") == 2

    def both_running() -> dict[Any, float] | None:
        assert provider.non_terminated_nodes({}) == ids
        samples = scrape(port)
        return samples if vms(samples, "running") == 2 else None

    running = wait_until(both_running, "both VMs running in the provider's metrics")
    assert vms(running, "spawned") == 0 and vms(running, "stopping") == 0
    assert calls(running, "List") > calls(before, "List")

    provider.terminate_nodes(ids)
    after_stop = scrape(port)
    assert calls(after_stop, "Stop") == calls(before, "Stop") + 2
    assert vms(after_stop, "running") == 0

    # A Hypercore that does not answer: counted as such, by method.
    unreachable = make_provider(hypercore_address=f"127.0.0.1:{free_port()}", call_timeout_s=1)
    with pytest.raises(HypercoreUnavailable):
        unreachable.non_terminated_nodes({})
    assert calls(scrape(port), "List", "unavailable") == calls(before, "List", "unavailable") + 1

    # Every Hypercore and VM panel of the dashboard has data in a real Prometheus. Its latency
    # quantiles and error ratio divide by a rate, NaN unless a counter grew between two of its
    # samples: so one more List between a scrape after the traffic and two after that List.
    prom.wait_for_scrape(scrapes=1)
    listed_before = calls(scrape(port), "List")

    def listed_again() -> bool:
        provider.non_terminated_nodes({})
        return calls(scrape(port), "List") > listed_before

    wait_until(listed_again, "a List past the provider's cache")
    prom.wait_for_scrape()
    prom.require_panel_data(panels_naming("hyperfleet_hypercore_", "hyperfleet_vms"))


def test_a_worker_without_join_env_is_not_launched(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HYPERFLEET_JOIN_DB")
    provider = make_provider()
    with pytest.raises(NodeLaunchError, match="HYPERFLEET_JOIN_DB") as refused:
        create_workers(provider, 1)
    assert not refused.value.retryable
    assert provider.non_terminated_nodes({}) == []
    assert listed(hypercore, cluster_name) == {}


def test_a_partly_failed_launch_stops_the_nodes_that_started(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
) -> None:
    # Two of three fit the stand-in's capacity (max(CPUs, 225) cores); the third is refused.
    cores = max(os.cpu_count() or 1, 225) // 2
    provider = make_provider()
    with pytest.raises(NodeLaunchError, match=r"[12] of 3"):
        provider.create_node_with_resources_and_labels(
            {**NODE_CONFIG, "cores": cores}, worker_tags(), 3, {}, {}
        )
    assert provider.non_terminated_nodes({}) == []
    assert make_provider().non_terminated_nodes({}) == []
    assert wait_until(lambda: listed(hypercore, cluster_name) == {}, "List without the nodes")


def test_a_stray_of_a_terminated_node_is_stopped_without_failing_reads(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
) -> None:
    provider = make_provider()
    [node_id] = create_workers(provider, 1)
    request = wait_until(
        lambda: next(
            (
                w.request
                for h in hypercore.list()
                for w in h.workloads
                if f"HYPERFLEET_INSTANCE_ID={node_id}" in w.request.env
            ),
            None,
        ),
        "the workload in List",
    )
    provider.terminate_node(node_id)
    # What Hypercore does when it respawns a workload from a stale entry.
    stray = hypercore.spawn(
        SpawnRequest(
            cores=request.cores,
            memory_mb=request.memory_mb,
            image_ref=request.image_ref,
            ports={},
            env=tuple(request.env),
            dry_run=False,
        )
    )
    wait_until(
        lambda: listed(hypercore, cluster_name).get(node_id) == [stray.id], "the stray in List"
    )
    fresh = make_provider()  # knows the node only from its tombstone
    assert fresh.non_terminated_nodes({}) == []
    assert not fresh.is_running(node_id, refresh=True)
    # Reads Stop it in the background (they neither wait for the Stop nor raise its errors).
    wait_until(
        lambda: fresh.non_terminated_nodes({}) == [] and listed(hypercore, cluster_name) == {},
        f"the stray {stray.id} stopped",
    )


@pytest.mark.timeout(180)
def test_terminate_stops_a_respawn_that_list_did_not_show_yet(
    make_provider: Callable[..., HypercoreNodeProvider],
    hypercore: HypercoreClient,
    cluster_name: str,
) -> None:
    provider = make_provider()
    [node_id] = create_workers(provider, 1)
    [first] = wait_until(lambda: listed(hypercore, cluster_name).get(node_id), "List")
    for pid in wait_until(lambda: workload_pids(node_id), "the workload's process"):
        os.kill(pid, signal.SIGKILL)
    # The stand-in has dropped the exited workload and is starting it again under a new id,
    # which List shows only after its next refresh.
    wait_until(lambda: first not in listed(hypercore, cluster_name).get(node_id, []), "respawn")
    make_provider().terminate_node(node_id)
    deadline = time.monotonic() + 3 * REFRESH_INTERVAL_S
    while time.monotonic() < deadline:
        assert node_id not in listed(hypercore, cluster_name)
        time.sleep(0.2)
    assert wait_until(lambda: not workload_pids(node_id), "the workload's processes to exit")
