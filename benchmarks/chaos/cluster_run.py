"""``python -m benchmarks.chaos.cluster_run``: a chaos run on the Hypercore stand-in cluster, where
agent replicas live on worker VMs, so that node faults have something to hit.

The cluster is the autoscaler end-to-end test's (``tests/integration/autoscaling_cluster.py``):
the stand-in, a head that is itself a stand-in workload running autoscaler v2 with
``HypercoreNodeProvider``, CPU worker VMs with one VM slot each, and a driver subprocess; the API
and its pool controller run in it as in the pool test (``pool_load``), against an emulator of
its own. One difference: the VM images' entrypoint is ``vm_entry``, which starts each workload in
a cgroup of its own and marks the connections it opens, so that a partition can cut a worker off
the head both ways (see ``node_faults``).

The run's agent has ``isolation: vm`` and two replicas at all times (each on its own worker VM)
with room for every session on one of them; ``run.py``'s workload drives it (half the sessions
streamed, every message with an idempotency key, retried as a good client does), the seeded
schedule injects each fault kind once (``--mixed``: then mixed, as ``schedule`` plans), and the
sessions are resumed, read back and checked (``checker``); the table goes to stdout. Exit status
1 when the checker found anything.

    python -m benchmarks.chaos.cluster_run [--seed N] [--faults vm-sigterm,vm-sigkill,partition]
        [--users N] [--duration S] [--gap S] [--partition S] [--sigterm-via stop|signal]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from benchmarks.results_file import commit, machine, write_section
from cluster.cli.servers import start_emulator
from cluster.hypercore_standin import start_standin
from cluster.loadtest.tenant import Provisioned, release
from cluster.loadtest.users import Target
from hyperfleet.processes import free_port, reap_leftovers, stop
from tests.integration.autoscaling_cluster import (
    HEAD_IMAGE,
    NODE_IMAGE,
    Driver,
    Head,
    autoscaling_config,
    cluster_processes,
    start_head,
)

from .checker import Report
from .faults import KINDS, Injector, raylet_workers
from .history import History
from .node_faults import (
    NODE_KINDS,
    PARTITION_MAX_S,
    PARTITION_S,
    NodeInjector,
    StandinCluster,
    remove_cgroups,
    remove_tagged,
)
from .run import ChaosPlan, Control, _run
from .schedule import Planned, describe, schedule
from .table import render
from .vm_entry import cgroup2_root

VM_ENTRY = Path(__file__).resolve().with_name("vm_entry.py")
# Turns take about half a second, so that a fault lands in some of them (``__main__``'s).
EMULATOR_FLAGS = ("--ttft-ms=200", "--tps=100", "--jitter=0.2")
# The kinds that need no local stack's daemons: those of ``faults`` that act on Ray processes.
RAY_KINDS = tuple(k for k in KINDS if k in ("replica-kill", "replica-pause", "control-kill"))
CLUSTER_KINDS = (*NODE_KINDS, *RAY_KINDS)
MAX_WORKERS = 4  # two replicas' VMs, one in place of a lost one, one beside a partitioned one
IDLE_TIMEOUT_MINUTES = 1.0
CALL_TIMEOUT_S = 60.0
SERVE_START_TIMEOUT_S = 300.0  # Serve's controller, proxy and ingress on a busy 2-core machine
READY_TIMEOUT_S = 300.0  # the agent's two replicas, each on a VM the autoscaler Spawns
READY_POLL_S = 2.0
SETUP_TIMEOUT_S = 60.0
REPLICAS = 2
SECTION = "### Chaos run on the Hypercore stand-in cluster: worker VM faults under load"


def catalog(root: Path, tag: str) -> dict[str, Any]:
    """``start_standin_for``'s images, run through ``vm_entry`` (a cgroup and connection marks
    per workload, named by its address under ``tag``)."""
    entry = [
        "{python}",
        str(VM_ENTRY),
        "--cgroup",
        f"{tag}/{{workload_ip}}",
        "--address",
        "{workload_ip}",
        "--comment",
        f"{tag}:mark:{{workload_ip}}",
        "--",
        "{python}",
        "-m",
        "cluster.cli",
        "node",
    ]
    ip = "HYPERFLEET_NODE_IP={workload_ip}"
    return {
        "images": {
            NODE_IMAGE: {"argv": entry, "env": [ip]},
            HEAD_IMAGE: {
                "argv": entry,
                "env": [
                    ip,
                    f"HYPERFLEET_AUTOSCALING_CONFIG={root / 'autoscaling.yaml'}",
                    f"HYPERFLEET_HOME={root / 'head-home'}",
                ],
            },
        }
    }


def api_config(emulator_url: str, emulator_key: str, workspaces: Path) -> dict[str, Any]:
    """``pool_load.start_api``'s config, with the usage outbox swept every second after 2 s (the
    test tier's), so that the read-back need not wait a minute for what a killed replica left."""
    return {
        "runtime": {
            "anthropic_base_url": emulator_url,
            "anthropic_api_key": emulator_key,
            "workspaces": str(workspaces),
            "sweep_interval_s": 1.0,
            "usage_outbox_grace_s": 2.0,
        },
        "ip_requests_per_minute": 100_000,
        "pool": {
            "warm_floor": 0,
            "warm_spare": 0,
            "tick_s": 0.5,
            "min_scale_down_cooldown_s": 1,
            "capacity_wait_s": 90.0,
        },
    }


def agent_spec(users: int, run_id: str) -> dict[str, Any]:
    """Two replicas, each on a worker VM of its own (``isolation: vm``), each with room for every
    session: one VM lost, the other takes them all."""
    return {
        "system": f"You answer briefly (chaos run {run_id}).",
        "isolation": "vm",
        "max_sessions": max(users, 2),
        "resources": {"cores": 0.5, "memory_mb": 256},
        "replicas": {
            "min": REPLICAS,
            "max": REPLICAS,
            "scale_up_cooldown_s": 1,
            "scale_down_cooldown_s": 3,
        },
    }


async def _call(
    http: aiohttp.ClientSession,
    base_url: str,
    key: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with http.request(
        method,
        base_url + path,
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=aiohttp.ClientTimeout(total=SETUP_TIMEOUT_S),
    ) as response:
        data = await response.json(content_type=None)
        return response.status, data if isinstance(data, dict) else {}


async def provision_vm_tenant(
    http: aiohttp.ClientSession, base_url: str, admin_key: str, users: int, run_id: str
) -> Provisioned:
    """A user with room for the run, and the run's agent (``agent_spec``).

    Raises:
        RuntimeError: the API refused a step.
    """
    quotas = {
        "max_agents": 2,
        "max_keys": 2,
        "requests_per_minute": 1_000_000,
        "max_sessions": 2 * users + 10,
        "max_replicas": REPLICAS + 2,
        "max_cores": 16,
    }
    status, user = await _call(
        http, base_url, admin_key, "POST", "/v1/users", {"name": run_id, "quotas": quotas}
    )
    if status != 201:
        raise RuntimeError(f"creating the run's user: {status} {user}")
    key = str(user["api_key"])
    status, agent = await _call(
        http, base_url, key, "POST", "/v1/agents", agent_spec(users, run_id)
    )
    provisioned = Provisioned(Target(base_url, key, ""), str(user["id"]), key.split("_")[1])
    if status != 201:
        await release(http, base_url, admin_key, provisioned)
        raise RuntimeError(f"creating the run's agent: {status} {agent}")
    return Provisioned(Target(base_url, key, str(agent["id"])), str(user["id"]), key.split("_")[1])


async def replicas_ready(http: aiohttp.ClientSession, target: Target, timeout_s: float) -> None:
    """Waits until the agent's replicas are all ready (each on its VM).

    Raises:
        TimeoutError: not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    states: list[str] = []
    while time.monotonic() < deadline:
        status, detail = await _call(
            http, target.base_url, target.api_key, "GET", f"/v1/agents/{target.agent_id}"
        )
        states = [str(r.get("state")) for r in detail.get("replicas", [])] if status == 200 else []
        if states.count("ready") >= REPLICAS:
            return
        await asyncio.sleep(READY_POLL_S)
    raise TimeoutError(f"the agent's replicas were not ready in {timeout_s:g} s: {states}")


async def busy_nodes(target: Target) -> set[str]:
    """The Ray node ids of the agent's replicas that hold sessions now (empty if the API did
    not answer: then any VM with a replica is a target)."""
    try:
        async with aiohttp.ClientSession() as http:
            status, detail = await _call(
                http, target.base_url, target.api_key, "GET", f"/v1/agents/{target.agent_id}"
            )
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return set()
    replicas = detail.get("replicas", []) if status == 200 else []
    return {str(r["node_id"]) for r in replicas if r.get("node_id") and r.get("sessions")}


async def chaos_on_cluster(
    base_url: str,
    admin_key: str,
    plan: ChaosPlan,
    planned: Sequence[Planned],
    history: History,
    make_injector: Callable[[History, Target], Injector],
    control_db: Path,
    run_id: str,
) -> Report:
    """``run.run_chaos`` with the run's own tenant (a ``vm`` agent): provisioned, its replicas
    awaited on their VMs, the workload, faults and read-back, then the tenant removed."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tenant = await provision_vm_tenant(http, base_url, admin_key, plan.users, run_id)
        try:
            await replicas_ready(http, tenant.target, READY_TIMEOUT_S)
            print(f"chaos: the agent's {REPLICAS} replicas are ready on worker VMs", flush=True)
            return await _run(
                http,
                tenant.target,
                tenant.created_user_id,
                plan,
                planned,
                make_injector(history, tenant.target),
                history,
                Control(control_db),
                run_id,
            )
        finally:
            for problem in await release(http, base_url, admin_key, tenant):
                print(f"chaos: cleanup: {problem}", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # a SIGTERM tears the cluster down as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument(
        "--faults",
        default=",".join(NODE_KINDS),
        help=f"comma-separated, of: {', '.join(CLUSTER_KINDS)} ('_' for '-' is fine)",
    )
    parser.add_argument("--users", type=int, default=8, help="sessions, half of them streamed")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--gap", type=float, default=40.0, help="seconds between faults")
    parser.add_argument(
        "--partition", type=float, default=PARTITION_S, help="partition, seconds (past Ray's ~65 s)"
    )
    parser.add_argument("--pause", type=float, default=20.0, help="replica-pause, seconds")
    parser.add_argument("--sigterm-via", choices=("stop", "signal"), default="stop")
    parser.add_argument("--think-time", type=float, default=0.5, help="mean, seconds")
    parser.add_argument("--mixed", action="store_true", help="after each kind once, mixed faults")
    parser.add_argument("--results", action="store_true", help="write into RESULTS.md")
    args = parser.parse_args(argv)
    if not 0 < args.partition <= PARTITION_MAX_S:
        parser.error(f"--partition: 0 to {PARTITION_MAX_S:g} s")
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    kinds = tuple(k.strip().replace("_", "-") for k in args.faults.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(CLUSTER_KINDS))
    if unknown:
        parser.error(f"--faults: no {', '.join(unknown)}; the kinds: {', '.join(CLUSTER_KINDS)}")

    name = "chaos" + uuid.uuid4().hex[:6]
    tag = f"hf-{name}"
    root = Path(tempfile.mkdtemp(prefix="hyperfleet-chaos-vms-"))
    root.chmod(0o755)
    probe = NodeInjector(lambda _: [], lambda _: None, random.Random(seed))
    probe.pause_s, probe.partition_s, probe.sigterm_via = (
        args.pause,
        args.partition,
        args.sigterm_via,
    )
    planned = schedule(seed, kinds, args.duration, args.gap, probe.lasts_s())
    if not args.mixed:
        planned = planned[: len(kinds)]
    print(describe(seed, planned), flush=True)
    print(f"chaos: cluster {name} in {root}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)

    emulator_port = free_port()
    emulator_key = "sk-ant-chaos-" + secrets.token_hex(6)
    history = History(root / "history.jsonl")
    emulator = start_emulator(emulator_port, emulator_key, root / "emulator.log", *EMULATOR_FLAGS)
    head: Head | None = None
    driver: Driver | None = None
    standin = None
    try:
        (root / "catalog.json").write_text(json.dumps(catalog(root, tag)))
        standin = start_standin(
            root / "standin", refresh_interval_s=1.0, catalog=root / "catalog.json"
        )
        config = autoscaling_config(
            standin, name, root, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES, max_workers=MAX_WORKERS
        )
        began = time.monotonic()
        head = start_head(root, config)
        driver = Driver(head, root / "driver.log")
        driver.call("setup_store", CALL_TIMEOUT_S, path=str(root / "sessions.db"))
        workspaces = root / "workspaces"
        workspaces.mkdir(mode=0o711)
        api = driver.call(
            "serve_api",
            SERVE_START_TIMEOUT_S,
            port=free_port(),
            control_path=str(root / "control.db"),
            config=api_config(f"http://127.0.0.1:{emulator_port}", emulator_key, workspaces),
        )
        print(f"chaos: cluster and API up in {time.monotonic() - began:.0f} s", flush=True)
        cluster = StandinCluster(standin.client(), name, standin.state_dir, tag)
        gcs_address = head.gcs_address

        def make(history: History, target: Target) -> NodeInjector:
            async def busy() -> set[str]:
                return await busy_nodes(target)

            injector = NodeInjector(
                raylet_workers(gcs_address),
                history.add,
                random.Random(seed),
                cluster=cluster,
                busy_nodes=busy,
            )
            injector.pause_s = args.pause
            injector.partition_s = args.partition
            injector.sigterm_via = args.sigterm_via
            return injector

        plan = ChaosPlan(
            seed=seed,
            users=args.users,
            duration_s=args.duration,
            think_time_s=args.think_time,
            min_replicas=REPLICAS,
            meter_wait_s=30.0,
        )
        try:
            report = asyncio.run(
                chaos_on_cluster(
                    api["base_url"],
                    api["admin_key"],
                    plan,
                    planned,
                    history,
                    make,
                    root / "control.db",
                    name,
                )
            )
        finally:
            cluster.client.close()
    finally:
        history.close()
        with contextlib.suppress(Exception):  # each step on its own: tear everything down
            if driver is not None:
                driver.call("serve_down", CALL_TIMEOUT_S)
        with contextlib.suppress(Exception):
            if driver is not None:
                driver.close()
        with contextlib.suppress(Exception):
            if head is not None:
                head.stop()
        if standin is not None:
            standin.stop()
        reap_leftovers(cluster_processes(name))
        for problem in remove_tagged(f"{tag}:"):
            print(f"chaos: iptables cleanup: {problem}", file=sys.stderr)
        remove_cgroups(tag, cgroup2_root())
        stop(emulator)
    table = render(report, history.faults(), history.requests())
    print(table)
    print(f"history: {history.path}")
    if args.results:
        command = " ".join(sys.argv[1:] if argv is None else argv)
        write_section(
            f"{SECTION}\n\n`python -m benchmarks.chaos.cluster_run {command}`, seed {seed}, at "
            f"{commit('benchmarks/chaos')}, on {machine()}; the Hypercore stand-in cluster "
            f"(a head running autoscaler v2 with the Hypercore provider, worker VMs as stand-in "
            f"workloads, the agent's {REPLICAS} replicas on their own VMs, SQLite stores), "
            f"{args.users} sessions (half streamed) for {args.duration:g} s; "
            f"{describe(seed, planned)}.\n\n{table}\n"
        )
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
