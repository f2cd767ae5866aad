"""The life of a process Hyperfleet supervises: started in its own session, ready when it answers
within a deadline, and stopped with everything it started. Every role stops processes this one
way: the node agent (``ray start``, the join service), the local stack's daemons, the Hypercore
stand-in's workloads, and the servers the tests and benchmarks start.

Stopping follows containerd's task kill, which is also what ``ray start --block`` expects:

1. SIGTERM to the process alone, so that it stops its own children in order: a SIGTERM to its
   whole group would stop Ray's GCS before ``ray start`` drains the node, and Ray would then wait
   out its whole drain timeout.
2. After ``grace_s``, SIGKILL to its process group (``spawn`` makes it lead one).
3. Then SIGTERM, ``leftover_grace_s``, SIGKILL to the rest of its tree, as when a container's PID
   namespace ends with its init: what is left in its group, and the descendants that left the
   group (``setsid``: Ray Serve's HAProxy, the head's join service). Descendants are listed while
   the process runs: once it exits they are reparented, and no longer found below it.

A process is named by its pid and its start time (``ProcessId``), so a pid that the kernel gave
to another process after the first one exited is never signalled. A group is killed whole only
while its leader still holds the group's number (``_kill_group``); after that, its members are
looked up one by one, and only while no other process holds that number (``_group_of``). Every
wait has a deadline.

psutil reads the process table (``/proc`` here, ``sysctl`` on macOS, where ``hyperfleet up`` runs
too) rather than a parser of our own. The stop sequence is written once, as steps
(``_stop_steps``) that a blocking driver (``stop``) and an asyncio one (``stop_async``) both run,
so the two cannot drift.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from .private import open_private

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger("hyperfleet.processes")

STOP_GRACE_S = 45.0  # the default: a Ray head's `ray start --block` drains for up to 30 s
LEFTOVER_GRACE_S = 5.0
# For SIGKILLed processes to exit; one still there after it is stuck in the kernel (D state).
KILL_WAIT_S = 10.0
EXIT_POLL_S = 0.05
READY_POLL_S = 0.1
PROBE_TIMEOUT_S = 2.0


def started_since_boot_s(process: psutil.Process) -> float:
    """When ``process`` started, in seconds since the machine booted (to the clock tick).

    Not psutil's ``create_time()`` itself: that is this plus the boot time as the wall clock
    tells it now, which moves whenever the clock is stepped (NTP, a resumed VM), so a process
    compared by it would look gone, and be left running, after a step. The kernel's start
    ticks never move; this recovers them from ``create_time()``, which adds that boot time."""
    return round(process.create_time() - psutil.boot_time(), 2)


def boot_id() -> str:
    """This boot of the machine (Linux's random boot id; "" where there is none): a process
    recorded in another boot is gone, whatever now holds its pid."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessId:
    """One process over time: its pid and when it started (``started_since_boot_s``). The pid
    alone may name another process once this one has exited."""

    pid: int
    started_s: float

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The process that holds ``pid`` now (a zombie included); None if none does."""
        try:
            return cls(pid, started_since_boot_s(psutil.Process(pid)))
        except psutil.Error:
            return None

    def alive(self) -> bool:
        """Whether this process still runs: its pid still names it and it has not exited (a
        zombie has exited; only its parent has yet to collect its status)."""
        return self._running() is not None

    def send_signal(self, signum: int) -> bool:
        """Sends ``signum`` if this process still runs; returns whether it did. Never to this
        process itself: a supervisor does not stop itself."""
        process = self._running()
        if process is None or self.pid == os.getpid():
            return False
        try:
            process.send_signal(signum)  # psutil checks the start time again, just before
        except psutil.Error:
            return False
        return True

    def _running(self) -> psutil.Process | None:
        try:
            process = psutil.Process(self.pid)
            if started_since_boot_s(process) != self.started_s:
                return None
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return process


def _id(process: psutil.Process) -> ProcessId | None:
    try:
        return ProcessId(process.pid, started_since_boot_s(process))
    except psutil.Error:
        return None


def descendants(pid: int) -> list[ProcessId]:
    """Every process below ``pid`` now: its children, theirs, and so on; [] once it is gone."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [ident for process in below if (ident := _id(process)) is not None]


def _group_of(leader: ProcessId | None, pgid: int) -> list[ProcessId]:
    """The processes of group ``pgid`` but its leader (``leader``, None if it had exited before
    it was seen). None at all if another process holds the pid now: the kernel hands out a pid
    only once no process uses it as a group's number, so the number is then that process's."""
    holder = ProcessId.of(pgid)
    if holder is not None and holder != leader:
        return []
    members = []
    for pid in psutil.pids():
        if pid == pgid:
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.getpgid(pid) == pgid and (ident := ProcessId.of(pid)) is not None:
                members.append(ident)
    return members


class _Leader(Protocol):
    """The process a stop begins with, however it was started."""

    @property
    def pid(self) -> int: ...

    def exited(self) -> bool: ...

    def send_signal(self, signum: int) -> None:
        """Sends ``signum`` unless the process has exited."""

    def returncode(self) -> int | None: ...


@dataclass(frozen=True)
class _Child:
    """A child started with ``subprocess.Popen``. It is reaped only when ``exited`` finds it
    gone, so until then its pid, and its group's number, cannot be another process's."""

    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return self.process.poll() is not None

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)  # a no-op once Popen has collected its status

    def returncode(self) -> int | None:
        return self.process.returncode


@dataclass(frozen=True)
class _AsyncioChild:
    """A child started by asyncio, whose child watcher collects its status."""

    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return self.process.returncode is not None

    def send_signal(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def returncode(self) -> int | None:
        return self.process.returncode


@dataclass(frozen=True)
class _Named:
    """A process known by its ``ProcessId`` alone: not this process's child (a daemon that an
    earlier ``hyperfleet up`` started), so its exit status is its parent's to collect."""

    ident: ProcessId

    @property
    def pid(self) -> int:
        return self.ident.pid

    def exited(self) -> bool:
        return not self.ident.alive()

    def send_signal(self, signum: int) -> None:
        self.ident.send_signal(signum)

    def returncode(self) -> int | None:
        return None


def _kill_group(leader: _Leader) -> None:
    """SIGKILL to the leader's group while the leader has not exited (its group's number is then
    still its own), to the leader alone if it leads no group."""
    if leader.exited():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(leader.pid) == leader.pid:
            os.killpg(leader.pid, signal.SIGKILL)
            return
    leader.send_signal(signal.SIGKILL)


@dataclass(frozen=True)
class _Until:
    """A wait that a driver runs for the steps: until ``done()`` or ``timeout_s``; it sends back
    whether ``done()`` came true."""

    done: Callable[[], bool]
    timeout_s: float


@dataclass(frozen=True)
class _Finished:
    status: int | None


_Steps = Generator[_Until, bool, int | None]


def _stop_steps(
    leader: _Leader,
    grace_s: float,
    leftover_grace_s: float,
    kill_wait_s: float,
    known: Iterable[ProcessId],
) -> _Steps:
    """The stop sequence of the module docstring; returns the leader's exit status, None if it
    had to be killed (or its status is not ours to collect)."""
    tree = set(known)
    leader_id: ProcessId | None = None
    killed = False
    if not leader.exited():
        leader_id = ProcessId.of(leader.pid)
        tree.update(descendants(leader.pid))
        leader.send_signal(signal.SIGTERM)
        if not (yield _Until(leader.exited, grace_s)):
            logger.warning(
                "pid %d ignored SIGTERM for %.0f s: SIGKILL to its group", leader.pid, grace_s
            )
            tree.update(descendants(leader.pid))  # what it started during the grace period
            _kill_group(leader)
            killed = True
            if not (yield _Until(leader.exited, kill_wait_s)):
                logger.error("pid %d survived SIGKILL for %.0f s", leader.pid, kill_wait_s)
    tree.update(_group_of(leader_id, leader.pid))
    yield from _stop_all_steps(tree, leftover_grace_s, kill_wait_s)
    return None if killed else leader.returncode()


def _stop_all_steps(
    processes: Iterable[ProcessId], grace_s: float, kill_wait_s: float
) -> Generator[_Until, bool, None]:
    rest = [process for process in processes if process.alive()]
    if not rest:
        return

    def gone() -> bool:
        return not any(process.alive() for process in rest)

    for process in rest:
        process.send_signal(signal.SIGTERM)
    if (yield _Until(gone, grace_s)):
        return
    for process in rest:
        process.send_signal(signal.SIGKILL)
    if not (yield _Until(gone, kill_wait_s)):
        survivors = [process.pid for process in rest if process.alive()]
        logger.error("pids %s survived SIGKILL for %.0f s", survivors, kill_wait_s)


def _advance(steps: _Steps, done: bool | None) -> _Until | _Finished:
    try:
        return next(steps) if done is None else steps.send(done)
    except StopIteration as e:
        return _Finished(e.value)


def _wait(until: _Until) -> bool:
    deadline = time.monotonic() + until.timeout_s
    while not until.done():
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            return False
        time.sleep(min(EXIT_POLL_S, left_s))
    return True


def _run(steps: _Steps) -> int | None:
    outcome = _advance(steps, None)
    while isinstance(outcome, _Until):
        outcome = _advance(steps, _wait(outcome))
    return outcome.status


def stop(
    process: subprocess.Popen[bytes] | ProcessId,
    grace_s: float = STOP_GRACE_S,
    *,
    leftover_grace_s: float = LEFTOVER_GRACE_S,
    kill_wait_s: float = KILL_WAIT_S,
    known: Iterable[ProcessId] = (),
) -> int | None:
    """Stops ``process`` and everything it started, as the module docstring says.

    Args:
        process: a child (``spawn`` starts it in its own group), or a process known by its id
            alone (a daemon recorded in a pid file).
        grace_s: how long it has to exit after SIGTERM before its group is SIGKILLed.
        leftover_grace_s: the same for the rest of its tree; 0 kills it at once, as the end of
            a PID namespace does.
        kill_wait_s: how long to wait for SIGKILLed processes to exit.
        known: processes of its tree seen earlier (``descendants``), for those reparented
            since.

    Returns:
        Its exit status if it exited by itself or after SIGTERM; None if it had to be killed,
        or if it is not this process's child.
    """
    leader: _Leader = _Named(process) if isinstance(process, ProcessId) else _Child(process)
    return _run(_stop_steps(leader, grace_s, leftover_grace_s, kill_wait_s, known))


async def stop_async(
    process: asyncio.subprocess.Process,
    grace_s: float = STOP_GRACE_S,
    *,
    leftover_grace_s: float = LEFTOVER_GRACE_S,
    kill_wait_s: float = KILL_WAIT_S,
    known: Iterable[ProcessId] = (),
) -> int | None:
    """``stop`` for a child that asyncio started: the same steps, run without blocking the
    event loop (each step in a thread, the waits on the loop)."""
    import asyncio  # here: the node agent, a VM's entrypoint, does not load asyncio for this

    loop = asyncio.get_running_loop()
    steps = _stop_steps(_AsyncioChild(process), grace_s, leftover_grace_s, kill_wait_s, known)
    outcome = await asyncio.to_thread(_advance, steps, None)
    while isinstance(outcome, _Until):
        deadline = loop.time() + outcome.timeout_s
        done = outcome.done()
        while not done and (left_s := deadline - loop.time()) > 0:
            await asyncio.sleep(min(EXIT_POLL_S, left_s))
            done = outcome.done()
        outcome = await asyncio.to_thread(_advance, steps, done)
    return outcome.status


def reap_leftovers(
    processes: Iterable[ProcessId],
    grace_s: float = LEFTOVER_GRACE_S,
    kill_wait_s: float = KILL_WAIT_S,
) -> None:
    """SIGTERM, ``grace_s``, then SIGKILL to those of ``processes`` that still run: the last step
    of ``stop``, for processes found otherwise (a test's cluster, by the env they carry)."""
    _run(_stop_all_steps(processes, grace_s, kill_wait_s))


def reap_orphans(own_pids: Collection[int]) -> list[int]:
    """Collects the status of this process's exited children but ``own_pids``; returns their
    pids.

    A container's entrypoint is PID 1, and orphans (a Ray worker that outlived its raylet) are
    reparented to it: without a wait they stay zombies. The children in ``own_pids`` are left to
    ``Popen``, which needs their exit status.
    """
    reaped = []
    for child in psutil.Process().children():
        if child.pid in own_pids:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            if os.waitpid(child.pid, os.WNOHANG)[0] == child.pid:
                reaped.append(child.pid)
        except (psutil.Error, ChildProcessError):  # gone meanwhile, or collected by another
            continue
    return reaped


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    pass_fds: Collection[int] = (),
    umask: int | None = None,
) -> subprocess.Popen[bytes]:
    """Starts ``argv`` to be supervised.

    In its own session: a terminal's Ctrl-C reaches only its supervisor, which decides what its
    children get, and ``stop`` can signal its group. Its stdin is /dev/null; its output is
    appended to ``log`` (a 0600 file, its missing folders 0700: a log may hold what a secret
    file would), or else goes where this process's goes. ``umask`` (say ``PRIVATE_UMASK``) is
    the child's, for a server whose own files must be private; None: this process's.
    """
    env_copy = None if env is None else dict(env)
    child_umask = -1 if umask is None else umask  # -1: Popen leaves the umask as it is
    if log is None:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            env=env_copy,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            umask=child_umask,
        )
    with os.fdopen(open_private(log, os.O_WRONLY | os.O_APPEND), "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env_copy,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            umask=child_umask,
        )


class StartError(RuntimeError):
    """A server did not become ready; the message carries the end of its log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server about to start there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_http_ok(url: str, timeout_s: float) -> bool:
    """Polls ``url`` until it answers 200 or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:  # noqa: S310
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(READY_POLL_S)
    return False


def wait_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> bool:
    """Polls 127.0.0.1:``port`` until it accepts a connection, ``process`` exits, or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S):
                return True
        except OSError:
            time.sleep(READY_POLL_S)
    return False
