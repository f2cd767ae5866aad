"""``ray up cluster.yaml`` and ``ray down cluster.yaml`` against the Hypercore stand-in, as a user
runs them: Ray's own CLI, the repository's cluster.yaml (a temp copy pointed at the stand-in)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
)

from autoscaling import HypercoreNodeProvider
from cluster.hypercore_standin import StandinHandle, start_standin
from hyperfleet.processes import free_port

from .autoscaling_cluster import cluster_workloads
from .waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
RAY_UP_TIMEOUT_S = 300
STANDIN_REFRESH_S = 1.0


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinHandle]:
    handle = start_standin(tmp_path_factory.mktemp("standin"), refresh_interval_s=STANDIN_REFRESH_S)
    try:
        yield handle
    finally:
        handle.stop()


def _ray(
    *args: str, cwd: Path, timeout_s: float = RAY_UP_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    # Not this test session's Ray settings: `ray up` talks to Hypercore only.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HYPERFLEET_"))}
    env["HYPERFLEET_HOME"] = str(cwd / "home")
    return subprocess.run(
        [RAY, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.timeout(2 * RAY_UP_TIMEOUT_S + 120)
def test_ray_up_then_ray_down(standin: StandinHandle, tmp_path: Path) -> None:
    config: dict[str, Any] = yaml.safe_load((REPO / "cluster.yaml").read_text())
    name = "up" + uuid.uuid4().hex[:6]
    config["cluster_name"] = name
    config["provider"].update(
        hypercore_address=standin.grpc_address,
        state_dir=str(tmp_path / "provider"),
        head_ray_port=free_port(),
    )
    config["available_node_types"]["head"]["node_config"] = {"cores": 1, "memory_mb": 2048}
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(yaml.safe_dump(config))
    hypercore = standin.client()

    up = _ray("up", "-y", "--no-config-cache", str(cluster_yaml), cwd=tmp_path)
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]

    # The head is a Hypercore workload whose node agent started Ray with the autoscaler.
    [head_id] = cluster_workloads(hypercore, name, "head")
    provider = HypercoreNodeProvider(config["provider"], name)  # a fresh instance
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD}) == [head_id]
    # `ray up`'s updater marked it up to date; the tag outlives the `ray up` process.
    assert provider.node_tags(head_id)[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE
    logs = provider.node_logs(head_id)
    assert "Ray runtime started." in logs
    assert "--autoscaling-config=" in logs, logs[-4000:]
    # Again: the same head is found by its tags and kept, not relaunched.
    again = _ray("up", "-y", "--no-config-cache", str(cluster_yaml), cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert list(cluster_workloads(hypercore, name, "head")) == [head_id]
    head_ip = _ray("get-head-ip", str(cluster_yaml), cwd=tmp_path, timeout_s=120)
    assert head_ip.returncode == 0, head_ip.stderr
    assert head_ip.stdout.strip().splitlines()[-1] == provider.internal_ip(head_id)

    down = _ray("down", "-y", str(cluster_yaml), cwd=tmp_path)
    assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-4000:]
    wait_until(lambda: cluster_workloads(hypercore, name, "head") == {}, "no head in List")
    wait_until(lambda: cluster_workloads(hypercore, name, "worker") == {}, "no worker in List")
    # And it stays empty: nothing Hypercore respawned after `ray down`'s last List leaks.
    deadline = time.monotonic() + 3 * STANDIN_REFRESH_S
    while time.monotonic() < deadline:
        assert cluster_workloads(hypercore, name, "head") == {}
        assert cluster_workloads(hypercore, name, "worker") == {}
        time.sleep(STANDIN_REFRESH_S / 4)
    hypercore.close()
