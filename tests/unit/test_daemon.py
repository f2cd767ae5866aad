from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.cli.daemon import Daemons
from hyperfleet import processes


def test_start_state_stop_a_real_process(tmp_path: Path) -> None:
    daemons = Daemons(tmp_path / "run", tmp_path / "logs")
    argv = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    started = daemons.start("sleeper", argv)
    assert started.running and started.pid
    assert daemons.start("sleeper", argv).pid == started.pid  # idempotent
    deadline = time.monotonic() + 10
    while "up" not in started.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemons.stop("sleeper", grace_s=5)
    assert not daemons.state("sleeper").running
    assert not daemons.stop("sleeper")
    assert "up" in started.log.read_text()


def test_a_reused_pid_is_not_signalled(tmp_path: Path) -> None:
    daemons = Daemons(tmp_path / "run", tmp_path / "logs")
    (tmp_path / "run").mkdir()
    # Our own pid with a start time that is not ours: a stale record must not kill us.
    record = {
        "pid": __import__("os").getpid(),
        "started_since_boot_s": -1.0,
        "boot_id": processes.boot_id(),
        "argv": [],
    }
    (tmp_path / "run" / "ghost.json").write_text(json.dumps(record))
    assert not daemons.state("ghost").running
    assert not daemons.stop("ghost")


def test_stop_reaps_children_that_left_the_group(tmp_path: Path) -> None:
    import subprocess

    from hyperfleet.processes import ProcessId, stop

    pid_file = tmp_path / "orphan.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = ProcessId.of(int(pid_file.read_text()))
    assert orphan is not None and orphan.alive()
    stop(parent, grace_s=5)
    assert not orphan.alive()  # gone (or a zombie) when stop returns


def test_a_pid_file_from_before_start_times_in_seconds_still_stops_its_process(
    tmp_path: Path,
) -> None:
    # A stack started by an older Hyperfleet recorded Linux clock ticks since boot.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (tmp_path / "run").mkdir()
        record = {"pid": process.pid, "start_ticks": int(ticks), "argv": []}
        (tmp_path / "run" / "old.json").write_text(json.dumps(record))
        daemons = Daemons(tmp_path / "run", tmp_path / "logs")
        assert daemons.state("old").running
        assert daemons.stop("old", grace_s=5)
        assert process.wait(timeout=10) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_a_pid_file_from_an_earlier_boot_is_not_ours(tmp_path: Path) -> None:
    # After a reboot the recorded pid and start time may name a new process: never signal it.
    me = processes.ProcessId.of(os.getpid())
    assert me is not None
    (tmp_path / "run").mkdir()
    record = {
        "pid": me.pid,
        "started_since_boot_s": me.started_s,
        "boot_id": "an-earlier-boot",
        "argv": [],
    }
    (tmp_path / "run" / "ghost.json").write_text(json.dumps(record))
    daemons = Daemons(tmp_path / "run", tmp_path / "logs")
    assert not daemons.state("ghost").running
    assert not daemons.stop("ghost")
