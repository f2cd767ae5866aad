"""A short chaos run (issue 17's tier) on the session's API: 12 sessions, half streamed, for
30 s, while three agent replicas and the control store are SIGKILLed; then every session is
resumed and read back, the control store's metering read, and the checker must find nothing
lost, duplicated, out of order or mis-metered. The workload is the load tester's engine over
HTTP, the faults real signals to real processes (``benchmarks/chaos``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors import replica_name
from benchmarks.chaos import ChaosPlan, Control, History, run_chaos
from benchmarks.chaos.checker import CHECKS
from benchmarks.chaos.faults import AGENT, Injector, raylet_workers
from benchmarks.chaos.schedule import Planned, describe
from benchmarks.chaos.table import render
from cluster.loadtest.users import Target
from hyperfleet.names import NAMESPACE

from .conftest import ApiServer, RayCluster

SEED = 17
PLAN = ChaosPlan(
    seed=SEED,
    users=12,
    duration_s=30.0,
    think_time_s=0.2,
    max_retries=10,
    min_replicas=2,
    meter_wait_s=20.0,  # the tier's outbox is swept every second, after 2 s
)
SCHEDULE = [
    Planned(4.0, "replica-kill"),
    Planned(10.0, "control-kill"),
    Planned(16.0, "replica-kill"),
    Planned(22.0, "replica-kill"),
]
STATS_TIMEOUT_S = 20.0


def _workers(ray_cluster: RayCluster, agent_id: str) -> Callable[[str], list[int]]:
    """The run's agent's replica processes that hold sessions (asked of Ray: the session's
    cluster may hold other tests' replicas), and any other Ray worker by its title."""
    others = raylet_workers(f"127.0.0.1:{ray_cluster.gcs_port}")

    def find(title: str) -> list[int]:
        if title != AGENT:
            return others(title)
        pids = []
        for i in range(PLAN.min_replicas):
            try:
                handle = ray.get_actor(replica_name(agent_id, i), namespace=NAMESPACE)
                stats = ray.get(handle.stats.remote(), timeout=STATS_TIMEOUT_S)
                if stats["sessions"]:
                    pids.append(int(stats["pid"]))
            except (ValueError, RayActorError, GetTimeoutError):
                continue  # not there (yet), or restarting: the other one is the target
        return pids

    return find


async def test_replica_and_control_store_kills_lose_nothing(
    api_server: ApiServer, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    history = History(tmp_path / "history.jsonl")

    def make(history: History, target: Target) -> Injector:
        workers = _workers(ray_cluster, target.agent_id)
        return Injector(workers, history.add, random.Random(SEED))

    try:
        report = await run_chaos(
            api_server.base_url,
            api_server.admin_key,
            PLAN,
            SCHEDULE,
            make,
            history,
            Control(api_server.data_dir / "control.db"),
            f"tier{SEED}",
        )
    finally:
        history.close()
    faults = history.faults()
    why = f"{describe(SEED, SCHEDULE)}\n{render(report, faults)}\nhistory: {history.path}"
    print(why)  # with -s: what the run saw, when it passes too
    assert [f.kind for f in faults] == [p.kind for p in SCHEDULE], why
    assert {name: report.count(name) for name in CHECKS} == dict.fromkeys(CHECKS, 0), why
    # Not a vacuous run: turns went through, the kills cut some short, and every session
    # they disturbed acknowledged a turn again.
    assert report.acked >= 50, why
    assert sum(r.disturbed for r in report.recoveries) > 0, why
    assert all(r.unrecovered == 0 for r in report.recoveries), why
