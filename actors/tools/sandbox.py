"""Running tool processes in a sandbox: bubblewrap, an unprivileged user, their own namespaces,
and limits on what they may use.

Ray is one trust domain: whoever reaches its ports with its token runs code on every node. So a
tool process must not see Ray's session directory or token, nor reach Ray, Redis or store ports.
Each command runs under ``bwrap`` as ``nobody`` (when the replica is root) in new user, pid, ipc,
uts, cgroup and network namespaces, with a read-only ``/usr``, its own ``/proc``, a read-only
root and ``/dev``, small in-memory ``/tmp`` and ``/dev/shm``, and only the session workspace
writable at ``/workspace``. Nothing of the host's ``/root``, ``/home``, ``/tmp`` (Ray's session
directory lives there) or ``/etc`` secrets is mounted. ``--disable-userns`` keeps the command
from making a user namespace of its own (in which it would be uid 0, with every capability over
what it mounts there).

Limits, so that one tool call cannot take its node down:
- ``prlimit`` runs *inside* the sandbox, after bubblewrap made its user namespace, and sets
  RLIMIT_NPROC, RLIMIT_AS, RLIMIT_CPU (SIGXCPU, then SIGKILL a second later), RLIMIT_FSIZE and no
  core files, then runs the command. RLIMIT_NPROC is checked against the processes of the uid in
  the caller's user namespace (Linux 5.14+ counts per namespace): set inside, it counts this call's
  processes only, not those of every sandbox that shares ``nobody`` on the node, nor the replica's
  own when it is not root. Set outside, the same limit would be the uid's across the node, and a
  fork bomb in one session would stop every other session's tools.
- ``choom`` gives the call's processes an OOM score adjustment of 1000, so that when memory runs
  out, the kernel kills tool processes before Ray, the replica or the stores.
- The workspace's disk quota is measured while the command runs (``workspace.py`` says why), and
  a command that grows the workspace past it is stopped; no file may be larger than the quota.
- The wall clock is the tool's timeout (``builtin.py``); output is capped here.

Without egress the network namespace has only its own loopback: no route to anything. With
``egress: true`` the node's network is shared, and the process runs as its own uid, whose packets
the egress firewall (``egress.py``) rejects on the way to loopback, the node's addresses, the
cluster's other nodes and private ranges: the internet is reachable, the platform is not.

If bubblewrap is missing, or too old to disable user namespaces, the tool fails with that message:
it never falls back to running the command unsandboxed or unlimited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .egress import EgressFirewall, EgressUnavailable
from .workspace import MIB, SANDBOX_MOUNT, Usage, Workspace, sandbox_uid

MAX_OUTPUT_BYTES = 64 * 1024
READ_CHUNK_BYTES = 16 * 1024
OOM_SCORE_ADJ = 1000  # the most: tool processes are the first the OOM killer takes
# The workspace is measured this often while a command runs, or less often when measuring takes
# longer (never more than a twentieth of the time).
DISK_CHECK_S = 0.25
DISK_CHECK_SHARE = 20
BWRAP_HELP_TIMEOUT_S = 10.0
_ETC_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/hosts")
_EGRESS_ETC = ("/etc/resolv.conf", "/etc/ssl", "/etc/ca-certificates", "/etc/nsswitch.conf")
_NEEDED_BWRAP_FLAGS = ("--disable-userns", "--size", "--remount-ro")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (bubblewrap or util-linux missing or too old)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one command's processes may use (``actors.spec.ToolLimits``, in bytes)."""

    processes: int = 256
    memory_bytes: int = 2048 * MIB
    cpu_s: int = 120
    file_size_bytes: int = 1024 * MIB
    tmp_bytes: int = 256 * MIB


@dataclass(frozen=True)
class Completed:
    exit_code: int | None  # None: killed at the timeout, or stopped (``stopped`` says why)
    output: str
    truncated: bool
    stopped: str | None = None  # why the sandbox stopped the command before it ended


def _root_dirs() -> list[str]:
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


@functools.cache
def _bwrap_flags(bwrap: str) -> frozenset[str]:
    """The flags this bubblewrap knows (``--disable-userns`` came in 0.8.0)."""
    try:
        done = subprocess.run(
            [bwrap, "--help"],
            capture_output=True,
            text=True,
            timeout=BWRAP_HELP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(w for w in (done.stdout + done.stderr).split() if w.startswith("--"))


class Sandbox:
    def __init__(
        self,
        egress: bool = False,
        bwrap: str | None = None,
        limits: SandboxLimits | None = None,
        firewall: EgressFirewall | None = None,
    ) -> None:
        self.egress = egress
        self.bwrap = bwrap or shutil.which("bwrap")
        self.setpriv = shutil.which("setpriv")
        self.prlimit = shutil.which("prlimit")
        self.choom = shutil.which("choom")
        self.limits = limits or SandboxLimits()
        self.firewall = firewall if firewall is not None else EgressFirewall()

    def check(self) -> None:
        """Raises ``SandboxUnavailable`` unless every program the sandbox needs is here."""
        if self.bwrap is None:
            raise SandboxUnavailable(
                "the tool sandbox needs bubblewrap (bwrap), not installed here"
            )
        missing = [f for f in _NEEDED_BWRAP_FLAGS if f not in _bwrap_flags(self.bwrap)]
        if missing:
            raise SandboxUnavailable(
                f"the tool sandbox needs bubblewrap 0.8 or later ({self.bwrap} has no "
                f"{', '.join(missing)})"
            )
        if self.prlimit is None or self.choom is None:
            raise SandboxUnavailable("the tool sandbox needs prlimit and choom (util-linux)")
        if os.geteuid() == 0 and self.setpriv is None:
            raise SandboxUnavailable("running tools as root needs setpriv (util-linux)")

    def file_size_limit(self, workspace: Workspace) -> int:
        """The largest file a command may write: the limit, and never more than the quota."""
        if workspace.disk_quota_bytes is None:
            return self.limits.file_size_bytes
        return min(self.limits.file_size_bytes, workspace.disk_quota_bytes)

    def _limited(self, command: list[str], workspace: Workspace) -> list[str]:
        """``command`` under the limits, as run inside the sandbox."""
        assert self.prlimit is not None and self.choom is not None  # ``check`` ran
        lim = self.limits
        file_size = self.file_size_limit(workspace)
        rlimits = [
            f"--nproc={lim.processes}:{lim.processes}",
            f"--as={lim.memory_bytes}:{lim.memory_bytes}",
            f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}",  # SIGXCPU first, SIGKILL a second later
            f"--fsize={file_size}:{file_size}",
            "--core=0:0",
        ]
        return [self.choom, "-n", str(OOM_SCORE_ADJ), "--", self.prlimit, *rlimits, "--", *command]

    def argv(self, workspace: Workspace, command: list[str]) -> list[str]:
        self.check()
        assert self.bwrap is not None
        args = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
        args += ["--die-with-parent", "--new-session"]
        if self.egress:
            args.append("--share-net")
        args += _root_dirs()
        for path in _ETC_FILES + (_EGRESS_ETC if self.egress else ()):
            args += ["--ro-bind-try", path, path]
        args += ["--proc", "/proc", "--dev", "/dev"]
        tmp = str(self.limits.tmp_bytes)
        for fresh in ("/dev/shm", "/tmp"):  # noqa: S108 - fresh, sized tmpfs of the sandbox's
            args += ["--perms", "1777", "--size", tmp, "--tmpfs", fresh]
        args += ["--bind", str(workspace.root), SANDBOX_MOUNT, "--chdir", SANDBOX_MOUNT]
        # The root and /dev are tmpfs that bwrap made: writable, they would be memory with no
        # limit. Read-only, only the workspace and the two sized tmpfs above take writes.
        args += ["--remount-ro", "/dev", "--remount-ro", "/"]
        args += ["--hostname", "sandbox", "--clearenv"]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": SANDBOX_MOUNT,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
        }
        for key, value in env.items():
            args += ["--setenv", key, value]
        args = [*args, "--", *self._limited(command, workspace)]
        if os.geteuid() == 0:
            # Drop to nobody before bwrap starts. Done by setpriv (util-linux) rather than
            # Popen(user=...): Ray runs async actors on uvloop, whose subprocesses take no user.
            assert self.setpriv is not None
            uid = sandbox_uid(self.egress)
            drop = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            args = [self.setpriv, *drop, "--no-new-privs", *args]
        return args

    async def run(self, workspace: Workspace, command: list[str], timeout_s: float) -> Completed:
        """Runs ``command`` with no stdin; output (stdout and stderr together) is capped. A
        command that grows the workspace past its disk quota is stopped."""
        if self.egress:
            try:
                await asyncio.to_thread(self.firewall.ensure)
            except EgressUnavailable as e:
                raise SandboxUnavailable(str(e)) from e
        await asyncio.to_thread(self.check)  # runs ``bwrap --help`` once per process
        argv = self.argv(workspace, command)
        quota = workspace.disk_quota_bytes
        # A workspace already over its quota may shrink (a command deleting files) but not grow.
        allowed = None
        count_entries = True
        if quota is not None:
            before = await asyncio.to_thread(workspace.usage, quota)
            if not before.complete:  # over the quota already: how far over, to allow no more
                before = await asyncio.to_thread(workspace.usage)
            allowed = max(quota, before.bytes)
            count_entries = before.over(None) is None  # already too many: let it delete them
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        assert process.stdout is not None
        chunks: list[bytes] = []
        size = 0
        truncated = False
        stopped: str | None = None

        async def drain() -> None:
            nonlocal size, truncated
            assert process.stdout is not None
            while chunk := await process.stdout.read(READ_CHUNK_BYTES):
                if size < MAX_OUTPUT_BYTES:
                    chunks.append(chunk[: MAX_OUTPUT_BYTES - size])
                if size + len(chunk) > MAX_OUTPUT_BYTES:
                    truncated = True
                size += len(chunk)
            await process.wait()

        def grown_past(usage: Usage) -> str | None:
            too_many = count_entries and usage.over(None) is not None
            if allowed is None or (usage.bytes <= allowed and not too_many):
                return None
            return usage.over(None) if too_many else usage.over(quota)

        async def watch_disk() -> None:
            nonlocal stopped
            interval_s = DISK_CHECK_S
            while process.returncode is None:
                await asyncio.sleep(interval_s)
                started = time.monotonic()
                usage = await asyncio.to_thread(workspace.usage, allowed)
                interval_s = max(DISK_CHECK_S, (time.monotonic() - started) * DISK_CHECK_SHARE)
                reason = grown_past(usage)
                if reason is not None and process.returncode is None:
                    stopped = reason
                    _kill_group(process.pid)
                    return

        watcher = asyncio.create_task(watch_disk()) if allowed is not None else None
        exit_code: int | None = None
        try:
            await asyncio.wait_for(drain(), timeout_s)
            exit_code = None if stopped else process.returncode
        except TimeoutError:
            pass
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if process.returncode is None:  # timed out, or the turn was cancelled
                _kill_group(process.pid)
                await asyncio.shield(process.wait())
        if stopped is None and allowed is not None:
            # Grown past the quota since the last measure: the command ended; say so now.
            stopped = grown_past(await asyncio.to_thread(workspace.usage, allowed))
        output = b"".join(chunks).decode("utf-8", errors="replace")
        return Completed(exit_code, output, truncated, stopped)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
