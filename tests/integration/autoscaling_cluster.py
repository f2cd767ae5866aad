"""A second, autoscaling Ray cluster on one machine, as ``ray up`` builds it: the Hypercore
stand-in, a head that is itself a Hypercore workload created through ``HypercoreNodeProvider``
(the node agent, role head, running autoscaler v2 with the provider), and a driver subprocess to
talk to it. Shared by the autoscaler end-to-end test and the benchmark.

Workers are real Hypercore workloads of Hyperfleet's node image (``hyperfleet node`` on its own
127.88.x.y address), joining with a one-time ticket. The head's image differs from the node image
only in its env, which names the autoscaler config file and the head's home: on one machine the
stand-in's workloads share the filesystem, where a real head gets the config in its env.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    STATUS_UNINITIALIZED,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from autoscaling import HypercoreNodeProvider
from cluster.hypercore import HypercoreClient
from cluster.hypercore_standin import StandinHandle, start_standin
from cluster.hypercore_standin.host import workload_tmp_dir
from hyperfleet.processes import ProcessId, free_port, stop, tail

REPO = Path(__file__).resolve().parents[2]
NODE_IMAGE = "ghcr.io/hyperfleet/node:latest"
HEAD_IMAGE = "test.local/hyperfleet-head:latest"
HEAD_CPUS = 4
HEAD_MEMORY_MB = 4096
WORKER_MEMORY_MB = 2048
HEAD_READY_TIMEOUT_S = 120.0
DRIVER_CONNECT_TIMEOUT_S = 60.0
TOKEN_FILE = "ray_auth_token"  # where the head's node agent keeps the cluster's token
REPLY_MARKER = "@@driver-reply "


def start_standin_for(root: Path, refresh_interval_s: float = 1.0) -> StandinHandle:
    """The stand-in, with Hyperfleet's node image and the head's variant of it."""
    node = {"argv": ["{python}", "-m", "cluster.cli", "node"]}
    catalog = {
        "images": {
            NODE_IMAGE: {**node, "env": ["HYPERFLEET_NODE_IP={workload_ip}"]},
            HEAD_IMAGE: {
                **node,
                "env": [
                    "HYPERFLEET_NODE_IP={workload_ip}",
                    f"HYPERFLEET_AUTOSCALING_CONFIG={root / 'autoscaling.yaml'}",
                    f"HYPERFLEET_HOME={root / 'head-home'}",
                ],
            },
        }
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "catalog.json").write_text(json.dumps(catalog))
    return start_standin(
        root / "standin", refresh_interval_s=refresh_interval_s, catalog=root / "catalog.json"
    )


def autoscaling_config(
    standin: StandinHandle,
    cluster_name: str,
    root: Path,
    *,
    idle_timeout_minutes: float,
    max_workers: int = 2,
) -> dict[str, Any]:
    """The repository's cluster.yaml, pointed at ``standin``, with small CPU VMs and no GPU types,
    prepared as ``ray up`` prepares it; written where the head's image expects it."""
    config: dict[str, Any] = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["cluster_name"] = cluster_name
    config["max_workers"] = max_workers
    config["idle_timeout_minutes"] = idle_timeout_minutes
    config["provider"].update(
        hypercore_address=standin.grpc_address,
        state_dir=str(root / "provider"),
        list_cache_ttl_s=0.5,
        head_ray_port=free_port(),
    )
    types = config["available_node_types"]
    for gpu_type in ("gpu", "gpu_mig"):
        del types[gpu_type]
    types["head"]["node_config"] = {"cores": 1, "memory_mb": HEAD_MEMORY_MB, "image": HEAD_IMAGE}
    types["head"]["resources"] = {"CPU": HEAD_CPUS}
    types["cpu"]["node_config"] = {"cores": 1, "memory_mb": WORKER_MEMORY_MB}
    types["cpu"]["max_workers"] = max_workers
    prepared = HypercoreNodeProvider.fillout_available_node_types_resources(
        prepare_config(copy.deepcopy(config))
    )
    validate_config(prepared)
    (root / "autoscaling.yaml").write_text(json.dumps(prepared))
    return prepared


@dataclass
class Head:
    provider: HypercoreNodeProvider
    instance_id: str
    gcs_address: str
    token_path: Path

    def logs(self) -> str:
        return self.provider.node_logs(self.instance_id)

    def diagnostics(self) -> str:
        """For a failed wait: the autoscaler's decisions (its log, in the head workload's own
        TMPDIR while the head runs), and each node's log (the node agent's and `ray start`'s)."""
        parts = []
        for workload_id in self.provider._workload_ids(self.instance_id):
            monitor = workload_tmp_dir(workload_id) / "ray/session_latest/logs/monitor.log"
            with contextlib.suppress(OSError):
                lines = monitor.read_text(errors="replace").splitlines()
                decisions = [line for line in lines if "legacy field" not in line]
                parts.append("the autoscaler's log ends:\n" + "\n".join(decisions[-40:]))
        for node_id in self.provider.non_terminated_nodes({}):
            parts.append(f"{node_id}'s log ends:\n{self.provider.node_logs(node_id)[-2500:]}")
        return "\n\n".join(parts)

    def stop(self) -> None:
        """Terminates every node of the cluster, workers first (as ``ray down`` does), so that
        none is respawned while its head goes away."""
        nodes = self.provider.non_terminated_nodes({})
        workers = [n for n in nodes if n != self.instance_id]
        self.provider.terminate_nodes([*workers, self.instance_id])


def start_head(root: Path, config: dict[str, Any]) -> Head:
    """Creates the head as ``ray up`` does: ``create_node`` with the head's tags, then the
    provider's command runner waits for ``ray start`` to have started Ray."""
    provider = HypercoreNodeProvider(config["provider"], config["cluster_name"])
    head_type = config["available_node_types"]["head"]
    tags = {
        TAG_RAY_NODE_KIND: NODE_KIND_HEAD,
        TAG_RAY_USER_NODE_TYPE: "head",
        TAG_RAY_NODE_NAME: f"ray-{config['cluster_name']}-head",
        TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED,
    }
    [instance_id] = provider.create_node_with_resources_and_labels(
        head_type["node_config"], tags, 1, head_type["resources"], head_type.get("labels", {})
    )
    head = Head(provider, instance_id, "", root / "head-home" / TOKEN_FILE)
    runner = provider.get_command_runner("", instance_id, {}, config["cluster_name"], None, True)  # type: ignore[arg-type]
    try:
        runner.run("ray start --head")
    except Exception as e:
        head.stop()
        raise RuntimeError(f"the head did not start: {e}") from e
    address = provider.internal_ip(instance_id)
    assert address, f"no address in the head's log:\n{head.logs()[-3000:]}"
    head.gcs_address = f"{address}:{config['provider']['head_ray_port']}"
    return head


class Driver:
    """The driver subprocess (``autoscaler_driver``): ``call(op, timeout_s, **kwargs)``."""

    def __init__(self, head: Head, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_path))
        self._log = log
        self._err = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.autoscaler_driver", head.gcs_address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            cwd=REPO,
            bufsize=0,
        )
        self._pending = b""
        self._read(DRIVER_CONNECT_TIMEOUT_S)

    def _line(self, deadline: float) -> str:
        """The next stdout line, read unbuffered so that ``select`` sees every byte."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("the driver did not answer in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the driver exited:\n{tail(self._log, 40)}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace")

    def _read(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (line := self._line(deadline)).startswith(REPLY_MARKER):
            pass  # Ray's own output
        reply = json.loads(line.removeprefix(REPLY_MARKER))
        if not reply["ok"]:
            raise RuntimeError(f"driver: {reply['error']}\n{reply.get('trace', '')}")
        return reply["result"]

    def call(self, op: str, timeout_s: float, **kwargs: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"op": op, **kwargs}) + "\n").encode())
        self.process.stdin.flush()
        return self._read(timeout_s)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            stop(self.process)  # type: ignore[arg-type]
        self._err.close()


def cluster_workloads(client: HypercoreClient, cluster_name: str, role: str) -> dict[str, str]:
    """Node id -> workload id of ``cluster_name``'s ``role`` workloads in Hypercore's List."""
    found: dict[str, str] = {}
    for host in client.list():
        for workload in host.workloads:
            env = dict(e.split("=", 1) for e in workload.request.env)
            if env.get("HYPERFLEET_CLUSTER") == cluster_name and (
                env.get("HYPERFLEET_NODE_ROLE") == role
            ):
                found[env["HYPERFLEET_INSTANCE_ID"]] = workload.id
    return found


def cluster_processes(cluster_name: str) -> list[ProcessId]:
    """Every process started with ``HYPERFLEET_CLUSTER=<cluster_name>`` in its env, for
    ``reap_leftovers``: the nodes' process trees, including children that left their process
    group (the head's join service, Ray's daemons)."""
    marker = f"HYPERFLEET_CLUSTER={cluster_name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and (process := ProcessId.of(int(entry.name))) is not None:
            found.append(process)
    return found


def node_agent_pid(node_id: str) -> int | None:
    """The node agent process of a workload (the top of its tree carrying the node's env)."""
    marker = f"HYPERFLEET_INSTANCE_ID={node_id}".encode()
    matches: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        matches[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tops = [pid for pid, parent in matches.items() if parent not in matches]
    return min(tops) if tops else None
