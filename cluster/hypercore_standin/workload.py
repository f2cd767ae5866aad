"""One workload of the stand-in: a local process tree standing in for a container or microVM.

The entrypoint runs in its own session (process group) with only the image's env, the Spawn's env
and a few host variables (``INHERITED_ENV``): never the stand-in's whole environment, which may
hold secrets (a Ray token path) that a real workload would not see. As a VM has its own /tmp, it
gets a ``TMPDIR`` of its own, removed with it: programs that name files there by what they find
free (Ray names its sockets so) do not collide with other workloads'. Its stdout and stderr go, as
with Hypercore's log file, to one file per workload, kept to its last ``LOG_TAIL_BYTES``.

Stopping follows containerd's task kill, as ``hyperfleet.processes.stop`` does: SIGTERM to the
entrypoint alone (so a ``ray start --block`` entrypoint can shut its node down itself), SIGKILL to
its group after the grace period, and then, as when a container's PID namespace ends with its
init, SIGKILL at once to whatever of the tree is left: the process group, and descendants that
left it (Ray Serve's HAProxy does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path

from hyperfleet.processes import ProcessId, descendants, stop_async

logger = logging.getLogger(__name__)

LOG_TAIL_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
PUMP_DRAIN_TIMEOUT_S = 2.0
KILL_WAIT_S = 5.0
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "PYTHONPATH")


def read_tail(path: Path, limit_bytes: int = LOG_TAIL_BYTES) -> bytes:
    """The last ``limit_bytes`` of a file.

    Raises:
        OSError: the file cannot be opened (FileNotFoundError for an unknown workload).
    """
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit_bytes))
        return f.read()


class _BoundedLog:
    """An append-only log file that keeps its last ``LOG_TAIL_BYTES``: once it reaches twice
    that, it is rewritten to its tail, so the cost of trimming is paid once per megabyte."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file = path.open("ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        self._size += len(data)
        if self._size >= 2 * LOG_TAIL_BYTES:
            self._file.close()
            tail = read_tail(self._path)
            tmp = self._path.with_suffix(".tmp")
            tmp.write_bytes(tail)
            tmp.replace(self._path)
            self._file = self._path.open("ab")
            self._size = len(tail)

    def close(self) -> None:
        self._file.close()


def workload_env(
    image_env: list[str], request_env: list[str], home: Path, tmp: Path
) -> dict[str, str]:
    """The environment a workload starts with: host basics, then the image's, then the Spawn's.

    A later ``K=V`` replaces an earlier ``K``, as containerd applies an image's and a task's env.
    """
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env["HOME"] = str(home)
    env["TMPDIR"] = str(tmp)
    for entry in [*image_env, *request_env]:
        key, _, value = entry.partition("=")
        env[key] = value
    return env


class WorkloadProcess:
    """A started workload process tree, its log pump, and how to end it."""

    def __init__(self, process: asyncio.subprocess.Process, log: _BoundedLog) -> None:
        self._process = process
        self._log = log
        self._tree: list[ProcessId] = []
        self._pump = asyncio.create_task(self._pump_output())

    @classmethod
    async def start(
        cls, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path
    ) -> WorkloadProcess:
        """Starts ``argv`` in its own session; returns once it has been executed.

        Raises:
            OSError: the executable cannot be run (missing, not executable).
        """
        log = _BoundedLog(log_path)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        return cls(process, log)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exited(self) -> bool:
        return self._process.returncode is not None

    async def _pump_output(self) -> None:
        stream = self._process.stdout
        assert stream is not None  # started with stdout=PIPE
        try:
            while chunk := await stream.read(READ_CHUNK_BYTES):
                self._log.write(chunk)
        finally:
            self._log.close()

    async def snapshot_tree(self) -> None:
        """Remembers the live descendants, so those that leave the process group can still be
        ended after the entrypoint exits on its own (its children are then reparented)."""
        if not self.exited:
            self._tree = await asyncio.to_thread(descendants, self.pid)

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM to the entrypoint, SIGKILL to its group after ``grace_s``, then SIGKILL to the
        rest of the tree. Returns when the entrypoint has exited and its output is drained (or
        abandoned).

        ``stop_async`` polls for exit rather than awaiting ``Process.wait()``: asyncio's wait
        also waits for the output pipe to close, which a descendant in its own session (the node
        agent's join service) keeps open after the entrypoint died, so it would never return."""
        # The tree as remembered, plus what it holds now, is killed like a PID namespace.
        await stop_async(
            self._process, grace_s, leftover_grace_s=0.0, kill_wait_s=KILL_WAIT_S, known=self._tree
        )
        try:
            await asyncio.wait_for(asyncio.shield(self._pump), PUMP_DRAIN_TIMEOUT_S)
        except TimeoutError:
            # Something outside the tree still holds the pipe; stop reading it.
            self._pump.cancel()
