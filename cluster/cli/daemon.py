"""Background processes of the local stack, tracked by pid files under ``$HYPERFLEET_HOME/run``.

A pid file records the pid and the process start time (from /proc), so ``down`` never signals an
unrelated process that reused the pid after a reboot or a crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hyperfleet.processes import descendants, reap_leftovers

STOP_GRACE_S = 10.0
POLL_S = 0.1


@dataclass(frozen=True)
class DaemonState:
    name: str
    pid: int | None
    running: bool
    log: Path


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may hold spaces, so split after ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


class Daemons:
    """Starts, inspects and stops named background processes."""

    def __init__(self, run_dir: Path, logs_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs_dir = logs_dir

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def state(self, name: str) -> DaemonState:
        log = self.logs_dir / f"{name}.log"
        try:
            record = json.loads(self._pidfile(name).read_text())
        except (OSError, ValueError):
            return DaemonState(name, None, False, log)
        pid = int(record["pid"])
        alive = _start_ticks(pid) == record.get("start_ticks")
        return DaemonState(name, pid, alive, log)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> DaemonState:
        """Starts ``argv`` detached from this terminal, its output appended to its log."""
        current = self.state(name)
        if current.running:
            return current
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with current.log.open("ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        record = {"pid": process.pid, "start_ticks": _start_ticks(process.pid), "argv": argv}
        self._pidfile(name).write_text(json.dumps(record))
        return self.state(name)

    def stop(self, name: str, grace_s: float = STOP_GRACE_S) -> bool:
        """SIGTERM, then SIGKILL after ``grace_s``. True if a running process was stopped."""
        current = self.state(name)
        self._pidfile(name).unlink(missing_ok=True)
        if not current.running or current.pid is None:
            return False
        tree = descendants(current.pid)
        os.killpg(current.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if _start_ticks(current.pid) is None or _is_zombie(current.pid):
                break
            time.sleep(POLL_S)
        else:
            os.killpg(current.pid, signal.SIGKILL)
        reap_leftovers(tree)
        return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
