"""Node-level faults for a chaos run on the Hypercore stand-in cluster (issue 17): a worker VM
stopped, a worker VM lost, a worker VM cut off from the head. Each returns the ``Fault`` the
history records (``faults.Injector`` records it).

The VMs are found through the stand-in's API: List gives each workload's id and the env it was
spawned with (its cluster, role and instance id); its process tree is found on this machine by
the ``HOME`` the stand-in gives each workload (``<state dir>/workloads/<id>``), and its address by
that tree's ``HYPERFLEET_NODE_IP``.

- ``vm-sigterm``: Hypercore's Stop through the client (SIGTERM to the node agent, which drains
  its Ray node; SIGKILL to the tree 5 s later; the workload removed, so the autoscaler brings up
  a VM in its place); or, with ``sigterm_via="signal"``, SIGTERM to the node agent alone, as a
  host shutting the VM down would, waiting out its whole drain (Ray's 30 s); the stand-in then
  spawns the workload again under a new id, as Hypercore respawns a workload that exited.
- ``vm-sigkill``: SIGKILL to every process of the workload's tree at once (node loss); the
  stand-in respawns it under a new id at its next refresh, a new Ray node.
- ``partition``: iptables rules that drop the traffic between a worker and the head for
  ``partition_s`` (longer than Ray's node death detection), removed in a ``finally``. On the
  stand-in every workload's outbound sockets leave from 127.0.0.1, so rules on addresses alone
  cannot cut the worker's own connections to the head: with both workloads started in cgroups by
  ``vm_entry`` the rules match each side's sockets by cgroup and the connection marks it set
  (a two-way partition of the pair, other traffic untouched); without, they drop everything to
  and from the worker's address (nothing reaches what the worker serves, the head's GCS health
  checks included, while the worker can still reach out: a one-way partition). Every rule
  carries a comment starting with the run's tag, so ``remove_tagged`` finds what a crash left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from cluster.hypercore import HypercoreClient, HypercoreError, UnknownWorkload

from .faults import InjectionError, Injector
from .history import Fault
from .vm_entry import IPTABLES_TIMEOUT_S, IPTABLES_WAIT_S, MARK_MASK, iptables, mark_of

NODE_KINDS = ("vm-sigterm", "vm-sigkill", "partition")
AGENT_TITLE = "ray::AgentActor"
# Ray's GCS marks a node dead after 5 failed health checks, each sent 3 s after the last and
# given 10 s (ray_config_def.h): ~15 s for a node whose port refuses (a killed one), but up to
# ~65 s for one that drops packets, as a partitioned one does (seen: dead 68 s in, its replica
# back on a new VM 25 s later). A shorter partition heals before Ray notices it; this one lasts
# until the replica has moved, so the partitioned one wakes up as a stale owner.
PARTITION_S = 120.0
PARTITION_MAX_S = 300.0
STOP_TIMEOUT_S = 30.0  # the stand-in's Stop: 5 s of grace, then SIGKILL and the kill's wait
DRAIN_WAIT_S = 45.0  # a SIGTERMed node agent: Ray's 30 s drain, then its processes' exit
KILL_DEADLINE_S = 10.0
POLL_S = 0.2
SigtermVia = Literal["stop", "signal"]


def node_lasts_s(
    partition_s: float = PARTITION_S, sigterm_via: SigtermVia = "stop"
) -> dict[str, float]:
    """How long each node kind runs (for ``schedule``): a Stop its grace, a partition its
    length, a SIGKILL nothing."""
    return {
        "vm-sigterm": 6.0 if sigterm_via == "stop" else DRAIN_WAIT_S,
        "partition": partition_s,
    }


@dataclass(frozen=True)
class Vm:
    """One stand-in workload of the cluster, as seen now."""

    workload_id: str
    instance_id: str
    role: str  # "head" or "worker"
    home: str  # the HOME the stand-in gave it: every process of its tree has it in its env
    address: str | None
    pids: tuple[int, ...]
    cgroup: str | None  # its cgroup v2 path (no leading /) when ``vm_entry`` made one

    @property
    def marker(self) -> str:
        return f"HOME={self.home}"

    def describe(self) -> str:
        where = f"{self.address}, workload {self.workload_id[:8]}"
        return f"{self.role} VM {self.instance_id} ({where})"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {k: v for k, _, v in pairs}


def pids_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (``K=V``, exact)."""
    needle = b"\0" + marker.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in b"\0" + (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return sorted(found)


def cgroup_of(pid: int) -> str | None:
    """The process's cgroup v2 path without its leading slash; None at the root or unknown."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            path = line[3:].strip("/")
            return path or None
    return None


def cluster_vms(client: HypercoreClient, cluster_name: str, state_dir: Path) -> list[Vm]:
    """The cluster's workloads in the stand-in's List, with their process trees and addresses
    (a workload whose tree is gone has no pids and may have no address)."""
    found = []
    for host in client.list():
        for workload in host.workloads:
            env = dict(e.split("=", 1) for e in workload.request.env if "=" in e)
            if env.get("HYPERFLEET_CLUSTER") != cluster_name:
                continue
            home = str(state_dir / "workloads" / workload.id)
            pids = tuple(pids_with(f"HOME={home}"))
            address = next((a for p in pids if (a := _environ(p).get("HYPERFLEET_NODE_IP"))), None)
            cgroups = {c for p in pids if (c := cgroup_of(p)) is not None}
            found.append(
                Vm(
                    workload.id,
                    env.get("HYPERFLEET_INSTANCE_ID", ""),
                    env.get("HYPERFLEET_NODE_ROLE", ""),
                    home,
                    address,
                    pids,
                    cgroups.pop() if len(cgroups) == 1 else None,
                )
            )
    return sorted(found, key=lambda vm: vm.instance_id)


def hosts_replica(vm: Vm) -> bool:
    """Whether one of the VM's processes is an agent replica."""
    for pid in vm.pids:
        with contextlib.suppress(psutil.Error):
            if AGENT_TITLE in " ".join(psutil.Process(pid).cmdline()):
                return True
    return False


def ray_node_id(vm: Vm) -> str | None:
    """The Ray node id of the VM's raylet (its ``--node_id``), if it runs."""
    for pid in vm.pids:
        with contextlib.suppress(psutil.Error):
            argv = psutil.Process(pid).cmdline()
            if argv and argv[0].endswith("/raylet"):
                for arg in argv:
                    if arg.startswith("--node_id="):
                        return arg.removeprefix("--node_id=")
    return None


def _root(pids: Sequence[int]) -> int | None:
    """The top of a tree: the pid whose parent is not in it (the node agent)."""
    members = set(pids)
    tops = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).ppid() not in members:
                tops.append(pid)
    return min(tops) if tops else None


async def vm_sigterm(
    client: HypercoreClient, vm: Vm, via: SigtermVia = "stop", drain_wait_s: float = DRAIN_WAIT_S
) -> Fault:
    """Stops a VM gracefully: Hypercore's Stop, or SIGTERM to its node agent (see the module)."""
    at = time.time()
    if via == "stop":
        try:
            await asyncio.to_thread(client.stop, vm.workload_id, STOP_TIMEOUT_S)
        except UnknownWorkload as e:
            raise InjectionError(f"{vm.describe()} was gone before its Stop") from e
        except HypercoreError as e:
            raise InjectionError(f"Stop of {vm.describe()}: {e}") from e
        detail = "Hypercore Stop: SIGTERM, 5 s, SIGKILL"
    else:
        agent = _root(vm.pids)
        if agent is None:
            raise InjectionError(f"{vm.describe()} has no process to signal")
        try:
            os.kill(agent, signal.SIGTERM)
        except ProcessLookupError as e:
            raise InjectionError(f"{vm.describe()}'s node agent exited before the SIGTERM") from e
        gone = await asyncio.to_thread(_wait_gone, vm.marker, drain_wait_s)
        detail = "SIGTERM to the node agent: a drain" + ("" if gone else ", still running after")
    return Fault("vm-sigterm", vm.describe(), at, time.time(), detail)


def _wait_gone(marker: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pids_with(marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def kill_tree(marker: str, deadline_s: float = KILL_DEADLINE_S) -> int:
    """SIGKILL to every process with ``marker`` in its env, again until none is left (one forked
    meanwhile is caught on the next pass); how many were killed.

    Raises:
        InjectionError: some still ran after ``deadline_s``.
    """
    killed: set[int] = set()
    deadline = time.monotonic() + deadline_s
    while pids := pids_with(marker):
        if time.monotonic() >= deadline:
            raise InjectionError(f"{len(pids)} processes with {marker} outlived their SIGKILL")
        for pid in pids:
            # The whole tree stops first, so that none reacts to its parent's death.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(POLL_S)
    return len(killed)


async def vm_sigkill(vm: Vm) -> Fault:
    """Node loss: the VM's whole process tree SIGKILLed at once."""
    if not vm.pids:
        raise InjectionError(f"{vm.describe()} has no process to kill")
    at = time.time()
    killed = await asyncio.to_thread(kill_tree, vm.marker)
    return Fault("vm-sigkill", vm.describe(), at, at, f"{killed} processes")


@dataclass(frozen=True)
class Endpoint:
    """One side of a partition: its address, and its cgroup when ``vm_entry`` made one."""

    address: str
    cgroup: str | None = None


def _drop(chain: str, *match: str, comment: str) -> tuple[str, ...]:
    return (chain, *match, "-m", "comment", "--comment", comment, "-j", "DROP")


def partition_rules(worker: Endpoint, head: Endpoint, comment: str) -> list[tuple[str, ...]]:
    """The rules (each after ``-I``/``-D``) of a partition between ``worker`` and ``head``.

    With both cgroups: in OUTPUT (where a packet still has its socket), what the worker's
    sockets send to the head's address or into a connection the head opened, and the same the
    other way. Without: in INPUT, everything to or from the worker's address."""
    if worker.cgroup is None or head.cgroup is None:
        return [
            _drop("INPUT", "-d", f"{worker.address}/32", comment=comment),
            _drop("INPUT", "-s", f"{worker.address}/32", comment=comment),
        ]
    rules = []
    for src, dst in ((worker, head), (head, worker)):
        assert src.cgroup is not None
        sent_by = ("-m", "cgroup", "--path", src.cgroup)
        rules.append(_drop("OUTPUT", *sent_by, "-d", f"{dst.address}/32", comment=comment))
        opened_by = ("-m", "connmark", "--mark", f"{mark_of(dst.address):#010x}/{MARK_MASK:#010x}")
        rules.append(_drop("OUTPUT", *sent_by, *opened_by, comment=comment))
    return rules


def iptables_argv(op: Literal["-I", "-D", "-A"], rule: Sequence[str]) -> list[str]:
    return [iptables(), "-w", str(IPTABLES_WAIT_S), op, *rule]


def tagged_deletions(saved: str, tag: str) -> list[list[str]]:
    """``iptables -D`` argvs for each rule of ``iptables -S`` output whose comment starts with
    ``tag``, last first."""
    argvs = []
    for line in saved.splitlines():
        words = shlex.split(line)
        if words[:1] != ["-A"] or "--comment" not in words:
            continue
        comment = words[words.index("--comment") + 1]
        if comment.startswith(tag):
            argvs.append(iptables_argv("-D", words[1:]))
    return argvs[::-1]


def require_iptables() -> None:
    """Raises ``InjectionError`` unless iptables can be run here (as root)."""
    if os.geteuid() != 0:
        raise InjectionError("a partition needs root (iptables)")
    if shutil.which("iptables") is None and not Path(iptables()).exists():
        raise InjectionError("a partition needs iptables, which is not installed")


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=IPTABLES_TIMEOUT_S)
    except subprocess.CalledProcessError as e:
        raise InjectionError(f"{shlex.join(argv)}: {e.stderr.decode(errors='replace')}") from e
    except subprocess.TimeoutExpired as e:
        raise InjectionError(f"{shlex.join(argv)}: no answer in {IPTABLES_TIMEOUT_S:g} s") from e


def remove_tagged(tag: str) -> list[str]:
    """Deletes every iptables rule whose comment starts with ``tag``; what could not be."""
    problems = []
    saved = subprocess.run(
        [iptables(), "-w", str(IPTABLES_WAIT_S), "-S"],
        check=False,
        capture_output=True,
        text=True,
        timeout=IPTABLES_TIMEOUT_S,
    )
    for argv in tagged_deletions(saved.stdout, tag):
        try:
            _run(argv)
        except InjectionError as e:
            problems.append(str(e))
    return problems


async def partition(worker: Vm, head: Vm, seconds: float, comment: str) -> Fault:
    """Cuts ``worker`` off ``head`` for ``seconds`` (at most ``PARTITION_MAX_S``); the rules go
    in a ``finally``, a cancelled run's included."""
    if not 0 < seconds <= PARTITION_MAX_S:
        raise ValueError(f"a partition lasts 0 to {PARTITION_MAX_S:g} s, not {seconds:g}")
    require_iptables()
    if worker.address is None or head.address is None:
        raise InjectionError(f"no address for {worker.describe()} or {head.describe()}")
    ends = (Endpoint(worker.address, worker.cgroup), Endpoint(head.address, head.cgroup))
    rules = partition_rules(*ends, comment)
    how = "cgroups" if len(rules) > 2 else "the worker's address"
    inserted: list[tuple[str, ...]] = []
    at = time.time()
    try:
        for rule in rules:
            await asyncio.to_thread(_run, iptables_argv("-I", rule))
            inserted.append(rule)
        await asyncio.sleep(seconds)
    finally:
        # Synchronous: this runs on cancellation too, where awaiting is not safe.
        for rule in reversed(inserted):
            with contextlib.suppress(InjectionError):
                _run(iptables_argv("-D", rule))
    detail = f"{seconds:g} s, by {how}"
    return Fault(
        "partition", f"{worker.describe()} from the head ({head.address})", at, time.time(), detail
    )


def remove_cgroups(parent: str, root: Path | None) -> None:
    """Removes the run's cgroups once their processes are gone (best effort)."""
    if root is None:
        return
    base = root / parent
    if not base.is_dir():
        return
    for child in sorted(base.iterdir(), reverse=True):
        if child.is_dir():
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        base.rmdir()


@dataclass(frozen=True)
class StandinCluster:
    """Where the node faults find their targets: the stand-in (its client and state dir), the
    cluster's name, and the tag every iptables rule of the run carries."""

    client: HypercoreClient
    name: str
    state_dir: Path
    tag: str

    def vms(self) -> list[Vm]:
        return cluster_vms(self.client, self.name, self.state_dir)


@dataclass
class NodeInjector(Injector):
    """``Injector`` with the node kinds too; a node fault hits a worker VM that hosts an agent
    replica (chosen with the injector's seeded ``rng``), a partition cuts it off the head."""

    cluster: StandinCluster | None = None
    partition_s: float = PARTITION_S
    sigterm_via: SigtermVia = "stop"
    # The Ray node ids whose replicas hold sessions now: a VM among them is hit first (a VM whose
    # replica holds no session would test nothing).
    busy_nodes: Callable[[], Awaitable[set[str]]] | None = None

    def lasts_s(self) -> dict[str, float]:
        return {**super().lasts_s(), **node_lasts_s(self.partition_s, self.sigterm_via)}

    async def inject(self, kind: str) -> Fault:
        if kind not in NODE_KINDS:
            return await super().inject(kind)
        fault = await self._node(kind)
        self.record(fault)
        return fault

    def _targets(self) -> tuple[list[Vm], list[Vm]]:
        if self.cluster is None:
            raise InjectionError("node faults need the stand-in cluster")
        vms = self.cluster.vms()
        workers = [vm for vm in vms if vm.role == "worker" and vm.pids and hosts_replica(vm)]
        heads = [vm for vm in vms if vm.role == "head" and vm.pids]
        return workers, heads

    async def _node(self, kind: str) -> Fault:
        workers, heads = await asyncio.to_thread(self._targets)
        assert self.cluster is not None
        if not workers:
            raise InjectionError("no worker VM hosts an agent replica")
        if self.busy_nodes is not None:
            busy = await self.busy_nodes()
            holding = [vm for vm in workers if ray_node_id(vm) in busy]
            workers = holding or workers
        vm = self.rng.choice(workers)
        if kind == "vm-sigterm":
            return await vm_sigterm(self.cluster.client, vm, self.sigterm_via)
        if kind == "vm-sigkill":
            return await vm_sigkill(vm)
        if not heads:
            raise InjectionError("the head VM was not found")
        return await partition(vm, heads[0], self.partition_s, f"{self.cluster.tag}:partition")
