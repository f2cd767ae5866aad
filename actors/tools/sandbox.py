"""Running tool processes in a sandbox: bubblewrap, an unprivileged user, their own namespaces.

Ray is one trust domain: whoever reaches its ports with its token runs code on every node. So a
tool process must not see Ray's session directory or token, nor reach Ray, Redis or store ports.
Each command runs under ``bwrap`` as ``nobody`` (when the replica is root) in new user, pid, ipc,
uts, cgroup and network namespaces, with a read-only ``/usr``, an empty ``/tmp``, its own ``/proc``
and only the session workspace writable at ``/workspace``. Nothing of the host's ``/root``,
``/home``, ``/tmp`` (Ray's session directory lives there) or ``/etc`` secrets is mounted.

Without egress the network namespace has only its own loopback: no route to anything. With
``egress: true`` the node's network is shared, and the process runs as its own uid, whose packets
the egress firewall (``egress.py``) rejects on the way to loopback, the node's addresses and
private ranges: the internet is reachable, the platform is not.

If bubblewrap is missing the tool fails with that message: it never falls back to running the
command unsandboxed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from .egress import EgressFirewall, EgressUnavailable
from .workspace import SANDBOX_MOUNT, Workspace, sandbox_uid

MAX_OUTPUT_BYTES = 64 * 1024
READ_CHUNK_BYTES = 16 * 1024
_ETC_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/hosts")
_EGRESS_ETC = ("/etc/resolv.conf", "/etc/ssl", "/etc/ca-certificates", "/etc/nsswitch.conf")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is not installed on this node."""


@dataclass(frozen=True)
class Completed:
    exit_code: int | None  # None: killed at the timeout
    output: str
    truncated: bool


def _root_dirs() -> list[str]:
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


class Sandbox:
    def __init__(self, egress: bool = False, bwrap: str | None = None) -> None:
        self.egress = egress
        self.bwrap = bwrap or shutil.which("bwrap")
        self.setpriv = shutil.which("setpriv")

    def argv(self, workspace: Workspace, command: list[str]) -> list[str]:
        if self.bwrap is None:
            raise SandboxUnavailable(
                "the tool sandbox needs bubblewrap (bwrap), not installed here"
            )
        args = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
        if self.egress:
            args.append("--share-net")
        args += _root_dirs()
        for path in _ETC_FILES + (_EGRESS_ETC if self.egress else ()):
            args += ["--ro-bind-try", path, path]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # noqa: S108 - a fresh tmpfs
        args += ["--bind", str(workspace.root), SANDBOX_MOUNT, "--chdir", SANDBOX_MOUNT]
        args += ["--hostname", "sandbox", "--clearenv"]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": SANDBOX_MOUNT,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
        }
        for key, value in env.items():
            args += ["--setenv", key, value]
        args = [*args, "--", *command]
        if os.geteuid() == 0:
            # Drop to nobody before bwrap starts. Done by setpriv (util-linux) rather than
            # Popen(user=...): Ray runs async actors on uvloop, whose subprocesses take no user.
            if self.setpriv is None:
                raise SandboxUnavailable("running tools as root needs setpriv (util-linux)")
            uid = sandbox_uid(self.egress)
            drop = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            args = [self.setpriv, *drop, "--no-new-privs", *args]
        return args

    async def run(self, workspace: Workspace, command: list[str], timeout_s: float) -> Completed:
        """Runs ``command`` with no stdin; output (stdout and stderr together) is capped."""
        if self.egress:
            try:
                await asyncio.to_thread(EgressFirewall.ensure)
            except EgressUnavailable as e:
                raise SandboxUnavailable(str(e)) from e
        argv = self.argv(workspace, command)
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

        exit_code: int | None = None
        try:
            await asyncio.wait_for(drain(), timeout_s)
            exit_code = process.returncode
        except TimeoutError:
            pass
        finally:
            if process.returncode is None:  # timed out, or the turn was cancelled
                _kill_group(process.pid)
                await asyncio.shield(process.wait())
        output = b"".join(chunks).decode("utf-8", errors="replace")
        return Completed(exit_code, output, truncated)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
