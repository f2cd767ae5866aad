"""Fault injectors for a chaos run on one machine, each recording a ``Fault`` (its start and end)
into the run's history for the checker's recovery times.

Processes are found the way ``benchmarks/local_stack.py``'s sampler names them: by Ray's process
title (``ray::AgentActor``, ``ray::ControlStoreActor``, ``ray::SessionStoreActor``) among the
descendants of given roots (the stack's daemons, or one raylet), never by a name machine-wide, so
another stack or the test session's cluster on the machine is never touched.

- ``replica-kill``: SIGKILL to one agent replica's process; Ray restarts it in place
  (``max_restarts=-1``) and its sessions reload from the store.
- ``replica-pause``: SIGSTOP to one replica for ``pause_s``, then SIGCONT. A pause longer than
  the pool's ``replica_unresponsive_s`` (30 s) has the pool controller kill it (Ray ends a
  stopped process too), so it never wakes to commit: one of the pool's min is restarted by Ray
  and keeps its sessions, one above it is gone and its sessions move to the other replicas; a
  shorter pause is a stall its requests wait out.
- ``control-kill`` / ``session-store-kill``: SIGKILL to the control store's (or the SQLite session
  store's) actor process; Ray restarts it over the same SQLite file.
- ``redis-restart`` (the local stack only): SIGKILL to ``redis-server``, ``redis_down_s`` down,
  then started again with the argv ``hyperfleet up`` recorded (``appendfsync always``).
- ``emulator-outage`` (the local stack only): the emulator stopped for ``outage_s``, then started
  again on the same port with the same argv and key: the model API's circuit must open and close.
- ``upstream-faults`` (the local stack only): the emulator restarted with ``upstream_rate`` of
  its calls failing (429, 529, 500, mid-stream error, dropped connection, a fifth each) for
  ``upstream_window_s``, then restarted as it was. The emulator has no runtime switch for its
  rates, so each restart is a second or so without it, enough to open the model API's circuit
  under load: this kind's recovery includes that.

The local stack runs every replica on its head, so a worker VM's SIGTERM (a drain) and SIGKILL
(node loss) through the Hypercore stand-in, and a partition between a worker VM and the head,
have no target here: they are ``node_faults``, on the stand-in cluster (``cluster_run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.local_stack import stack_roots
from cluster.cli.daemon import Daemons
from hyperfleet.private import PRIVATE_UMASK
from hyperfleet.processes import wait_http_ok, wait_port

from .history import Fault

AGENT = "ray::AgentActor"
CONTROL = "ray::ControlStoreActor"
SESSION_STORE = "ray::SessionStoreActor"
READY_TIMEOUT_S = 60.0
EXIT_POLL_S = 0.05
STATS_TIMEOUT_S = 5.0
STACK_KINDS = ("redis-restart", "emulator-outage", "upstream-faults")
KINDS = (
    "replica-kill",
    "replica-pause",
    "control-kill",
    "session-store-kill",
    *STACK_KINDS,
)
PAUSE_S = 20.0
REDIS_DOWN_S = 5.0
OUTAGE_S = 30.0
UPSTREAM_WINDOW_S = 20.0
UPSTREAM_RATE = 0.1
# A server restarted takes a second or two to answer again (the emulator twice, for its faults).
RESTART_S = 3.0
FAULT_FLAGS = ("--fault-429", "--fault-529", "--fault-500", "--fault-midstream", "--fault-drop")


def lasts_s(
    pause_s: float = PAUSE_S,
    outage_s: float = OUTAGE_S,
    redis_down_s: float = REDIS_DOWN_S,
    upstream_window_s: float = UPSTREAM_WINDOW_S,
) -> dict[str, float]:
    """How long each kind that is not instant runs, restarts included (for the schedule)."""
    return {
        "replica-pause": pause_s,
        "redis-restart": redis_down_s + RESTART_S,
        "emulator-outage": outage_s + RESTART_S,
        "upstream-faults": upstream_window_s + 2 * RESTART_S,
    }


class InjectionError(RuntimeError):
    """A fault could not be injected (its target was not found, a server did not come back)."""


def _titled(roots: list[psutil.Process], title: str) -> list[int]:
    pids = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    if title in " ".join(proc.cmdline()):
                        pids.append(proc.pid)
    return sorted(set(pids))


def stack_workers(home: Path) -> Callable[[str], list[int]]:
    """Pids of the local stack's processes (in ``home``) whose title holds a text."""
    return lambda title: _titled(stack_roots(home), title)


def raylet_workers(gcs_address: str) -> Callable[[str], list[int]]:
    """Pids of the Ray workers of the cluster at ``gcs_address`` (its raylets' children) whose
    title holds a text: for a cluster that is not a ``hyperfleet up`` stack (the test tier's)."""

    def find(title: str) -> list[int]:
        raylets = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            argv = proc.info["cmdline"] or []
            if proc.info["name"] == "raylet" and any(
                f"--gcs-address={gcs_address}" in a for a in argv
            ):
                raylets.append(proc)
        return _titled(raylets, title)

    return find


@dataclass
class StackDaemons:
    """The local stack's Redis and emulator, stopped and started again as ``up`` started them
    (the argv its pid files record)."""

    home: Path
    daemons: Daemons = field(init=False)

    def __post_init__(self) -> None:
        self.daemons = Daemons(self.home / "run", self.home / "logs")

    def argv(self, name: str) -> list[str]:
        record = json.loads((self.home / "run" / f"{name}.json").read_text())
        return [str(a) for a in record["argv"]]

    def kill(self, name: str) -> int | None:
        """SIGKILL to the daemon alone; its pid, once it has exited (None: it was not running)."""
        state = self.daemons.state(name)
        if not state.running or state.pid is None:
            return None
        self.daemons.signal(name, signal.SIGKILL)
        # Polled, not waited on: it is not this process's child, and a zombie counts as gone.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.daemons.state(name).running and time.monotonic() < deadline:
            time.sleep(EXIT_POLL_S)
        return state.pid

    def start(self, name: str, argv: list[str]) -> None:
        env = dict(os.environ)
        umask = None
        if name == "redis":
            umask = PRIVATE_UMASK
        else:
            key = (self.home / "emulator.key").read_text().strip()
            env["HYPERFLEET_EMULATOR_API_KEY"] = key
        self.daemons.start(name, argv, env, umask)

    def port(self, name: str) -> int:
        argv = self.argv(name)
        return int(argv[argv.index("--port") + 1])

    def ready(self, name: str) -> bool:
        port = self.port(name)
        if name == "redis":
            return wait_port(port, READY_TIMEOUT_S)
        return wait_http_ok(f"http://127.0.0.1:{port}/_emulator/stats", READY_TIMEOUT_S)


@dataclass
class Injector:
    """Injects faults of each kind; ``record`` takes each one's ``Fault`` once it ended."""

    workers: Callable[[str], list[int]]
    record: Callable[[Fault], None]
    rng: random.Random
    stack: StackDaemons | None = None
    pause_s: float = PAUSE_S
    redis_down_s: float = REDIS_DOWN_S
    outage_s: float = OUTAGE_S
    upstream_window_s: float = UPSTREAM_WINDOW_S
    upstream_rate: float = UPSTREAM_RATE

    def lasts_s(self) -> dict[str, float]:
        """How long each kind that is not instant runs (for the schedule)."""
        return lasts_s(self.pause_s, self.outage_s, self.redis_down_s, self.upstream_window_s)

    async def inject(self, kind: str) -> Fault:
        """Raises ``InjectionError`` when its target is missing."""
        runs = {
            "replica-kill": lambda: self._kill(kind, AGENT),
            "replica-pause": self._pause,
            "control-kill": lambda: self._kill(kind, CONTROL),
            "session-store-kill": lambda: self._kill(kind, SESSION_STORE),
            "redis-restart": self._redis,
            "emulator-outage": self._outage,
            "upstream-faults": self._upstream,
        }
        if kind not in runs:
            raise InjectionError(f"no fault {kind!r}; the kinds: {', '.join(KINDS)}")
        fault = await runs[kind]()
        self.record(fault)
        return fault

    async def _one(self, title: str) -> int:
        pids = await asyncio.to_thread(self.workers, title)  # it may ask Ray, or walk /proc
        if not pids:
            raise InjectionError(f"no {title} process found")
        return self.rng.choice(pids)

    async def _kill(self, kind: str, title: str) -> Fault:
        pid = await self._one(title)
        at = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError as e:
            raise InjectionError(f"{title} pid {pid} exited before the kill") from e
        return Fault(kind, f"{title} pid {pid}", at, at)

    async def _pause(self) -> Fault:
        pid = await self._one(AGENT)
        at = time.time()
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError as e:
            raise InjectionError(f"{AGENT} pid {pid} exited before the pause") from e
        try:
            await asyncio.sleep(self.pause_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return Fault("replica-pause", f"{AGENT} pid {pid}", at, time.time(), f"{self.pause_s:g} s")

    def _stack(self, kind: str) -> StackDaemons:
        if self.stack is None:
            raise InjectionError(f"{kind} needs the local stack's daemons")
        return self.stack

    async def _redis(self) -> Fault:
        stack = self._stack("redis-restart")
        argv = stack.argv("redis")
        at = time.time()
        pid = await asyncio.to_thread(stack.kill, "redis")
        await asyncio.sleep(self.redis_down_s)
        await self._restart(stack, "redis", argv)
        return Fault("redis-restart", f"redis-server pid {pid}", at, time.time())

    async def _outage(self) -> Fault:
        stack = self._stack("emulator-outage")
        argv = stack.argv("emulator")
        at = time.time()
        await asyncio.to_thread(stack.kill, "emulator")
        await asyncio.sleep(self.outage_s)
        await self._restart(stack, "emulator", argv)
        return Fault("emulator-outage", "emulator", at, time.time(), f"{self.outage_s:g} s")

    async def _upstream(self) -> Fault:
        stack = self._stack("upstream-faults")
        argv = without_faults(stack.argv("emulator"))
        share = f"{self.upstream_rate / len(FAULT_FLAGS):g}"
        faulty = [*argv, *(a for flag in FAULT_FLAGS for a in (flag, share))]
        at = time.time()
        await asyncio.to_thread(stack.kill, "emulator")
        await self._restart(stack, "emulator", faulty)
        model: dict[str, int] = {}
        try:
            await asyncio.sleep(self.upstream_window_s)
            # What the faulty API saw, read before it goes: the calls and the faults struck.
            model = await asyncio.to_thread(emulator_counts, stack.port("emulator"))
        finally:
            await asyncio.to_thread(stack.kill, "emulator")
            await self._restart(stack, "emulator", argv)
        detail = f"{self.upstream_rate:.0%} of calls for {self.upstream_window_s:g} s"
        return Fault("upstream-faults", "emulator", at, time.time(), detail, model)

    async def _restart(self, stack: StackDaemons, name: str, argv: list[str]) -> None:
        await asyncio.to_thread(stack.start, name, argv)
        if not await asyncio.to_thread(stack.ready, name):
            raise InjectionError(f"{name} did not come back; see {stack.home / 'logs'}")


def emulator_counts(port: int) -> dict[str, int]:
    """The emulator's ``/_emulator/stats`` as the model calls it took (``calls``: its
    ``POST /v1/messages``) and the faults it struck (``faults``); empty when it did not answer."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/_emulator/stats", timeout=STATS_TIMEOUT_S
        ) as answer:
            stats = json.loads(answer.read())
    except (OSError, ValueError):
        return {}
    calls = int((stats.get("requests") or {}).get("POST /v1/messages") or 0)
    faults = sum(int(n) for n in (stats.get("faults") or {}).values())
    return {"calls": calls, "faults": faults}


def without_faults(argv: list[str]) -> list[str]:
    """The emulator's argv less the fault flags (and their values) ``upstream-faults`` added."""
    out: Iterator[str] = iter(argv)
    kept = []
    for arg in out:
        if arg in FAULT_FLAGS:
            next(out, None)
        else:
            kept.append(arg)
    return kept
