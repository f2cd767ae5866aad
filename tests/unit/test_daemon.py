from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cluster.daemon import Daemons


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
    record = {"pid": __import__("os").getpid(), "start_ticks": -1, "argv": []}
    (tmp_path / "run" / "ghost.json").write_text(json.dumps(record))
    assert not daemons.state("ghost").running
    assert not daemons.stop("ghost")
