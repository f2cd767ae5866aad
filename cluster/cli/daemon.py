"""Background processes of the local stack, tracked by pid files under ``$HYPERFLEET_HOME/run``.

A pid file records the process's pid and start time (a ``ProcessId``), so ``down`` never signals
an unrelated process that reused the pid after a reboot or a crash. Starting and stopping are
``hyperfleet.processes``'s: a daemon runs in its own session, and a stop ends its whole tree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hyperfleet import processes
from hyperfleet.private import private_dir, write_private
from hyperfleet.processes import ProcessId

STOP_GRACE_S = 10.0


def _seconds_of_ticks(ticks: int) -> float:
    """A start time recorded as Linux clock ticks since boot (pid files of Hyperfleet before
    2026-12), in ``ProcessId``'s seconds: a stack started by an older Hyperfleet can still be
    stopped by this one."""
    return round(int(ticks) / os.sysconf("SC_CLK_TCK"), 2)


@dataclass(frozen=True)
class DaemonState:
    name: str
    pid: int | None
    running: bool
    log: Path


class Daemons:
    """Starts, inspects and stops named background processes."""

    def __init__(self, run_dir: Path, logs_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs_dir = logs_dir

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _recorded(self, name: str) -> ProcessId | None:
        try:
            record = json.loads(self._pidfile(name).read_text())
            if "start_ticks" in record:  # written before 2026-12 (Linux clock ticks since boot)
                return ProcessId(int(record["pid"]), _seconds_of_ticks(record["start_ticks"]))
            if record["boot_id"] != processes.boot_id():
                return None  # started in an earlier boot: whatever holds the pid is not it
            return ProcessId(int(record["pid"]), float(record["started_since_boot_s"]))
        except (OSError, ValueError, KeyError, TypeError):  # none, or not one of ours
            return None

    def state(self, name: str) -> DaemonState:
        log = self.logs_dir / f"{name}.log"
        recorded = self._recorded(name)
        if recorded is None:
            return DaemonState(name, None, False, log)
        return DaemonState(name, recorded.pid, recorded.alive(), log)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        umask: int | None = None,
    ) -> DaemonState:
        """Starts ``argv`` detached from this terminal, its output appended to its log (0600);
        ``umask`` is the process's (``hyperfleet.processes.spawn``)."""
        current = self.state(name)
        if current.running:
            return current
        private_dir(self.run_dir)
        private_dir(self.logs_dir)
        process = processes.spawn(argv, env=env, log=current.log, umask=umask)
        started = ProcessId.of(process.pid)
        record = {
            "pid": process.pid,
            "started_since_boot_s": started.started_s if started else None,
            "boot_id": processes.boot_id(),
            "argv": argv,
        }
        write_private(self._pidfile(name), json.dumps(record))
        return self.state(name)

    def signal(self, name: str, signum: int) -> bool:
        """Sends ``signum`` to the running daemon ``name`` alone (SIGHUP: read your
        configuration again). True if it was sent; never to a process that reused its pid."""
        recorded = self._recorded(name)
        return recorded is not None and recorded.send_signal(signum)

    def stop(self, name: str, grace_s: float = STOP_GRACE_S) -> bool:
        """SIGTERM, then SIGKILL after ``grace_s``, to it and its tree
        (``hyperfleet.processes.stop``). True if a running process was stopped."""
        recorded = self._recorded(name)
        self._pidfile(name).unlink(missing_ok=True)
        if recorded is None or not recorded.alive():
            return False
        processes.stop(recorded, grace_s)
        return True
