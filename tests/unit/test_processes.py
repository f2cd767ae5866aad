"""``hyperfleet.processes`` against real process trees: what a stop ends, what it spares, and that
it returns within its bounds.

Every process here runs ``SCRIPT`` in one role and notes its pid in a file once it is ready (its
signal handling set), so a test waits for that state rather than for time to pass.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hyperfleet.processes import (
    ProcessId,
    descendants,
    reap_leftovers,
    spawn,
    stop,
    stop_async,
)

WAIT_S = 20.0
SLEEP_S = 60  # how long a role runs unless stopped: far past every bound below

SCRIPT = f"""
import os, signal, subprocess, sys, time

role, folder = sys.argv[1], sys.argv[2]


def start(child_role, **options):
    return subprocess.Popen([sys.executable, __file__, child_role, folder], **options)


def graceful(signum, frame):
    open(os.path.join(folder, "got-sigterm"), "w").close()
    sys.exit(7)


if role in ("stubborn", "stubborn-leader", "escaper"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if role == "graceful":
    signal.signal(signal.SIGTERM, graceful)
if role == "tree":
    start("middle")
if role == "middle":
    start("escaper", start_new_session=True)
if role in ("stubborn-leader", "quitter"):
    start("stubborn")
if role == "runaway":
    start("escaper", start_new_session=True)
path = os.path.join(folder, role)
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(path + ".tmp", path)
if role != "quitter":
    time.sleep({SLEEP_S})
"""


def until(probe: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Roles:
    """Starts ``SCRIPT`` in a role, and names the processes that noted themselves."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.script = folder / "roles.py"
        self.script.write_text(SCRIPT)

    def argv(self, role: str) -> list[str]:
        return [sys.executable, str(self.script), role, str(self.folder)]

    def start(self, role: str) -> subprocess.Popen[bytes]:
        return spawn(self.argv(role))

    def ready(self, role: str) -> ProcessId:
        """The process of ``role``, once it has noted itself (its signal handling is set)."""
        path = self.folder / role
        until(path.exists, f"{role} to be ready")
        found = ProcessId.of(int(path.read_text()))
        assert found is not None and found.alive(), f"{role} is gone already"
        return found

    def noted(self) -> list[ProcessId]:
        names = ("tree", "middle", "escaper", "stubborn", "stubborn-leader", "runaway")
        paths = [self.folder / name for name in names]
        found = [ProcessId.of(int(path.read_text())) for path in paths if path.exists()]
        return [process for process in found if process is not None]


@pytest.fixture
def roles(tmp_path: Path) -> Iterator[Roles]:
    roles = Roles(tmp_path)
    yield roles
    reap_leftovers(roles.noted(), grace_s=0.0)  # whatever a failed test left running


def test_spawn_starts_a_session_of_its_own_with_no_stdin(tmp_path: Path) -> None:
    leads = "os.getsid(0) == os.getpgid(0) == os.getpid()"
    code = f"import os, sys; print({leads}, repr(sys.stdin.read()))"
    log = tmp_path / "logs" / "child.log"
    process = spawn([sys.executable, "-c", code], log=log)
    assert process.wait(WAIT_S) == 0
    assert log.read_text() == "True ''\n"  # its own session and group; stdin is /dev/null


def test_a_process_that_exits_on_sigterm_is_not_killed(roles: Roles) -> None:
    process = roles.start("graceful")
    roles.ready("graceful")
    assert stop(process, grace_s=WAIT_S) == 7  # its own exit status: None if it was killed
    assert (roles.folder / "got-sigterm").exists()


def test_a_descendant_that_left_the_group_and_ignores_sigterm_is_killed(roles: Roles) -> None:
    process = roles.start("tree")
    middle, escaper = roles.ready("middle"), roles.ready("escaper")
    assert os.getpgid(escaper.pid) != process.pid  # it left the group (setsid)
    assert {middle, escaper} <= set(descendants(process.pid))
    # The leader exits on SIGTERM; what it leaves behind is stopped all the same.
    assert stop(process, grace_s=WAIT_S, leftover_grace_s=0.5) == -signal.SIGTERM
    assert not middle.alive() and not escaper.alive()


def test_a_process_that_ignores_sigterm_is_killed_with_its_group_within_the_bounds(
    roles: Roles,
) -> None:
    process = roles.start("stubborn-leader")
    roles.ready("stubborn-leader")
    child = roles.ready("stubborn")  # in its group, and ignoring SIGTERM too
    began = time.monotonic()
    assert stop(process, grace_s=0.5, leftover_grace_s=0.5, kill_wait_s=5.0) is None  # killed
    assert time.monotonic() - began < SLEEP_S / 2  # the bounds, not the processes, ended it
    assert process.returncode == -signal.SIGKILL
    assert not child.alive()


def test_what_an_exited_process_left_in_its_group_is_stopped(roles: Roles) -> None:
    # As when `ray start` dies on its own: its group may still hold its processes.
    process = roles.start("quitter")
    child = roles.ready("stubborn")
    assert process.wait(WAIT_S) == 0
    assert stop(process, grace_s=0.0, leftover_grace_s=0.5) == 0
    assert not child.alive()


def test_known_descendants_are_stopped_after_their_parent_is_gone(roles: Roles) -> None:
    # Once a process has exited, the child that left its group is below nothing and in no group
    # of it: only an earlier look at its tree (``known``) finds it, as the stand-in's does.
    process = roles.start("runaway")
    escaper = roles.ready("escaper")
    roles.ready("runaway")
    known = descendants(process.pid)
    assert escaper in known
    process.kill()
    process.wait(WAIT_S)
    stop(process, leftover_grace_s=0.0, known=known)
    assert not escaper.alive()


def test_a_reused_pid_is_not_signalled(roles: Roles) -> None:
    process = roles.start("stubborn")
    running = roles.ready("stubborn")
    # The same pid with another start time: what a pid file says after the pid was reused.
    stale = ProcessId(running.pid, running.started_s - 1.0)
    assert not stale.alive()
    assert not stale.send_signal(signal.SIGKILL)
    assert stop(stale, grace_s=0.0) is None
    reap_leftovers([stale], grace_s=0.0)
    assert running.alive() and process.poll() is None
    assert stop(process, grace_s=0.0) is None  # ignores SIGTERM, so it had to be killed
    assert not running.alive()


def test_a_dead_pid_is_not_signalled_and_a_process_never_signals_itself() -> None:
    process = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    gone = ProcessId.of(process.pid)
    assert gone is not None
    process.communicate(b"\n", timeout=WAIT_S)  # it exits, and its status is collected
    assert not gone.alive()
    assert not gone.send_signal(signal.SIGKILL)
    assert stop(gone, grace_s=0.0) is None
    me = ProcessId.of(os.getpid())
    assert me is not None and me.alive()
    assert not me.send_signal(signal.SIGTERM)


async def test_stop_async_ends_the_tree_like_stop(roles: Roles) -> None:
    process = await asyncio.create_subprocess_exec(*roles.argv("tree"), start_new_session=True)
    middle, escaper = roles.ready("middle"), roles.ready("escaper")
    status = await stop_async(process, grace_s=WAIT_S, leftover_grace_s=0.0)
    assert status == -signal.SIGTERM == process.returncode
    assert not middle.alive() and not escaper.alive()


async def test_stop_async_kills_a_stubborn_tree_within_the_bounds(roles: Roles) -> None:
    process = await asyncio.create_subprocess_exec(
        *roles.argv("stubborn-leader"), start_new_session=True
    )
    roles.ready("stubborn-leader")
    child = roles.ready("stubborn")
    assert await stop_async(process, grace_s=0.5, leftover_grace_s=0.0, kill_wait_s=5.0) is None
    assert process.returncode == -signal.SIGKILL
    assert not child.alive()


def test_a_process_stays_itself_when_the_wall_clock_is_stepped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # psutil's create_time() is the start ticks plus the boot time by the wall clock, which
    # moves when the clock is stepped (NTP, a resumed VM): identity must not.
    import psutil._pslinux

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        recorded = ProcessId.of(child.pid)
        assert recorded is not None and recorded.alive()
        real_boot_time = psutil._pslinux.boot_time
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real_boot_time() + 1.0)
        assert recorded.alive()
        assert recorded.send_signal(signal.SIGTERM)
        assert child.wait(timeout=WAIT_S) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=WAIT_S)
