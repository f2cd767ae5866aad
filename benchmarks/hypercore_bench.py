"""Node and replica start times on Hypercore (the local stand-in), through autoscaler v2 and
``HypercoreNodeProvider``, on this machine.

1. Spawn -> Ray node alive: from the stand-in's "spawned" log line (Spawn is synchronous, so that
   is when Hypercore answered the autoscaler's Spawn) to the node first seen alive in Ray's node
   table (polled every 0.1 s), for each node the autoscaler adds.
2. Agent-replica start, from ``spawn_replica`` to its first ``health`` answer (the replica hosts
   sessions from then on), and to its first turn done (its model client, which it builds on a
   thread, is up by then):
   - on a new node: no VM slot is free, so the autoscaler Spawns a node for it;
   - on a warm node: a node with a free VM slot is already in the cluster, and its node agent
     has a spare Ray worker started (``cluster/node/warm_workers.py``): before each start the bench
     waits for one and reports those waits (each comes 1 s after the start that used the last);
   - for scale, a bare actor with the same placement on the warm node (Ray's own actor start:
     a new worker process).

Targets: new node <= 10 s, warm node <= 1 s.

    python -m benchmarks.hypercore_bench [--cold 2] [--warm 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import secrets
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="hyperfleet-hypercore-bench-"))
# Ray reads its token settings once per process: point them, before `import ray`, at the file the
# head's node agent will write (its HYPERFLEET_HOME is ROOT/head-home).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(ROOT / "head-home" / "ray_auth_token")

import ray  # noqa: E402

from actors import (  # noqa: E402
    AgentSpec,
    Resources,
    RuntimeConfig,
    placement_options,
    spawn_replica,
    start_store_actor,
)
from cluster.cli.servers import start_emulator  # noqa: E402
from cluster.node.warm_workers import RayletClient  # noqa: E402
from hyperfleet.processes import free_port, reap_leftovers, stop  # noqa: E402
from tests.integration.autoscaling_cluster import (  # noqa: E402
    autoscaling_config,
    cluster_processes,
    start_head,
    start_standin_for,
)

INSTANCE_LABEL = "hyperfleet/instance-id"
POLL_S = 0.1
START_TIMEOUT_S = 180.0
SPARE_TIMEOUT_S = 20.0
_SPAWNED = re.compile(r"^(\S+ \S+) INFO \S+: spawned (\S+) ")


class NodeWatcher:
    """Records when each instance id is first seen alive in Ray's node table."""

    def __init__(self) -> None:
        self.first_alive: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for node in ray.nodes():
                instance = (node.get("Labels") or {}).get(INSTANCE_LABEL)
                if node["Alive"] and instance and instance not in self.first_alive:
                    self.first_alive[instance] = now
            time.sleep(POLL_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def spawned_at(standin_log: Path, workload_to_node: dict[str, str]) -> dict[str, float]:
    """Node id -> epoch seconds of its "spawned" line in the stand-in's log."""
    found: dict[str, float] = {}
    for line in standin_log.read_text(errors="replace").splitlines():
        if (match := _SPAWNED.match(line)) and match.group(2) in workload_to_node:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            found[workload_to_node[match.group(2)]] = stamp.timestamp()
    return found


@ray.remote
class Bare:
    def ping(self) -> str:
        return "ok"


def spare_wait_s(raylet: RayletClient) -> float:
    """Seconds until the node has a spare worker (its agent starts one after one is used); the
    bench goes on without one after ``SPARE_TIMEOUT_S`` (a node with HYPERFLEET_WARM_WORKERS=0)."""
    start = time.monotonic()
    while not any(w.is_spare for w in raylet.workers()):
        if time.monotonic() - start > SPARE_TIMEOUT_S:
            print(f"no spare worker on the warm node within {SPARE_TIMEOUT_S} s", flush=True)
            break
        time.sleep(POLL_S)
    return time.monotonic() - start


def bare_start_s(spec: AgentSpec) -> float:
    start = time.monotonic()
    actor = Bare.options(**placement_options(spec)).remote()  # type: ignore[attr-defined]
    ray.get(actor.ping.remote(), timeout=START_TIMEOUT_S)
    elapsed = time.monotonic() - start
    ray.kill(actor)
    return elapsed


def replica_start_s(
    agent_id: str, spec: AgentSpec, runtime: RuntimeConfig
) -> tuple[float, float, str]:
    """Seconds from ``spawn_replica`` to its first ``health`` answer, and to its first turn done
    (a session opened and one message answered: the model client must be up by then)."""
    start = time.monotonic()
    handle = spawn_replica(agent_id, 0, spec, runtime)
    ray.get(handle.health.remote(), timeout=START_TIMEOUT_S)
    ready = time.monotonic() - start
    session = ray.get(handle.open_session.remote("bench"), timeout=START_TIMEOUT_S)
    ray.get(handle.send.remote(session["id"], "Hello"), timeout=START_TIMEOUT_S)
    first_turn = time.monotonic() - start
    stats = ray.get(handle.stats.remote(), timeout=60)
    return ready, first_turn, stats["node_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", type=int, default=2, help="replicas started on a new node")
    parser.add_argument("--warm", type=int, default=5, help="replicas started on a warm node")
    args = parser.parse_args()

    name = "bench" + uuid.uuid4().hex[:6]
    emulator_port = free_port()
    emulator_key = "sk-ant-bench-" + secrets.token_hex(6)
    emulator = start_emulator(emulator_port, emulator_key, ROOT / "emulator.log")
    standin = start_standin_for(ROOT)
    head = None
    watcher = None
    try:
        config = autoscaling_config(
            standin, name, ROOT, idle_timeout_minutes=10, max_workers=args.cold + 1
        )
        head = start_head(ROOT, config)
        ray.init(address=head.gcs_address, namespace="hyperfleet", log_to_driver=False)
        watcher = NodeWatcher()
        workspaces = ROOT / "workspaces"
        workspaces.mkdir(mode=0o711)
        runtime = RuntimeConfig(
            anthropic_base_url=f"http://127.0.0.1:{emulator_port}",
            anthropic_api_key=emulator_key,  # type: ignore[arg-type]
            workspaces=str(workspaces),
        )
        ray.get(start_store_actor(ROOT / "sessions.db").ping.remote(), timeout=60)
        spec = AgentSpec(tools=("bash",), resources=Resources(cores=0.5, memory_mb=256))

        cold: list[float] = []
        cold_turn: list[float] = []
        cold_agents = []
        cold_nodes = []
        for i in range(args.cold):
            agent_id = f"cold{i}"
            elapsed, turn, node_id = replica_start_s(agent_id, spec, runtime)  # holds the slot
            cold.append(elapsed)
            cold_turn.append(turn)
            cold_agents.append(agent_id)
            cold_nodes.append(node_id)
            print(f"replica on a new node #{i + 1}: {elapsed:.2f} s, turn {turn:.2f} s", flush=True)

        # Warm: free one node's slot, then start replicas on it again and again.
        ray.kill(ray.get_actor(f"agent-{cold_agents[0]}-0"), no_restart=True)
        node = next(n for n in ray.nodes() if n["NodeID"] == cold_nodes[0])
        raylet = RayletClient(
            f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}",
            Path(os.environ["RAY_AUTH_TOKEN_PATH"]),
        )
        warm: list[float] = []
        warm_turn: list[float] = []
        bare: list[float] = []
        refill: list[float] = []
        for i in range(args.warm):
            refill.append(spare_wait_s(raylet))
            bare.append(bare_start_s(spec))
            time.sleep(1.0)
            refill.append(spare_wait_s(raylet))
            agent_id = f"warm{i}"
            elapsed, turn, _ = replica_start_s(agent_id, spec, runtime)
            warm.append(elapsed)
            warm_turn.append(turn)
            print(f"replica on a warm node #{i + 1}: {elapsed:.2f} s, turn {turn:.2f} s")
            ray.kill(ray.get_actor(f"agent-{agent_id}-0"), no_restart=True)
            time.sleep(1.0)  # let the slot be released before the next start

        client = standin.client()
        workload_to_node = {
            w.id: dict(e.split("=", 1) for e in w.request.env)["HYPERFLEET_INSTANCE_ID"]
            for host in client.list()
            for w in host.workloads
        }
        spawned = spawned_at(standin.log, workload_to_node)
        node_start = [
            watcher.first_alive[node] - at
            for node, at in spawned.items()
            if node in watcher.first_alive and node != head.instance_id
        ]
        raylet.close()
        print()
        print("| measurement | result | target |")
        print("|---|---|---|")
        if node_start:
            print(
                f"| Spawn -> Ray node alive ({len(node_start)} nodes) | "
                f"median {statistics.median(node_start):.2f} s, max {max(node_start):.2f} s | |"
            )
        for label, times, target in (
            ("replica start on a new node", cold, "<= 10 s"),
            ("... and its first turn done", cold_turn, ""),
            ("replica start on a warm node", warm, "<= 1 s"),
            ("... and its first turn done", warm_turn, ""),
            ("bare actor start on a warm node", bare, ""),
            ("wait for the node's next spare worker", refill, ""),
        ):
            print(
                f"| {label} ({len(times)}) | median "
                f"{statistics.median(times):.2f} s, max {max(times):.2f} s | {target} |"
            )
    finally:
        if watcher is not None:
            watcher.close()
        ray.shutdown()
        if head is not None:
            try:
                head.stop()
            except Exception as e:  # noqa: BLE001 - report and go on tearing down
                print(f"stopping the head: {e}")
        standin.stop()
        reap_leftovers(cluster_processes(name))
        stop(emulator)
        shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
