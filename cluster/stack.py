"""The local stack behind ``hyperfleet up`` / ``down`` / ``status``.

Today it runs what exists: the Anthropic emulator (when no ``ANTHROPIC_API_KEY`` is set). The Ray
head, the session store and the Serve API join it as they land; ``up`` says what is not there yet.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .daemon import Daemons, DaemonState
from .processes import tail, wait_http_ok
from .settings import Settings

EMULATOR = "emulator"
DEFAULT_EMULATOR_PORT = 8090
READY_TIMEOUT_S = 30.0
NOT_YET = (
    "Ray head and session store (the agent runtime is in actors/, started with the API)",
    "Serve HTTP API, users and keys (hyperfleet chat)",
    "Hypercore stand-in and autoscaling",
)


class StackError(Exception):
    """The stack could not be brought up; the message says what to look at."""


@dataclass(frozen=True)
class StackInfo:
    emulator: DaemonState | None
    emulator_url: str | None
    emulator_key_file: Path | None
    not_yet: tuple[str, ...]


def _daemons(settings: Settings) -> Daemons:
    return Daemons(settings.run_dir, settings.logs_dir)


def _secret_file(path: Path, prefix: str) -> str:
    """Reads a generated key, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = prefix + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def up(
    settings: Settings, emulator_port: int, progress: Callable[[str], None] = print
) -> StackInfo:
    """Starts the local stack; idempotent (a running part is left as it is)."""
    daemons = _daemons(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    emulator = None
    url = key_file = None
    if settings.anthropic_api_key is None:
        key_file = settings.home / "emulator.key"
        key = _secret_file(key_file, "sk-ant-emu-")
        progress(f"[1/1] starting the Anthropic emulator on 127.0.0.1:{emulator_port} ...")
        env = dict(os.environ, HYPERFLEET_EMULATOR_API_KEY=key)
        argv = [sys.executable, "-m", "cluster.cli", "emulator", "--port", str(emulator_port)]
        emulator = daemons.start(EMULATOR, argv, env)
        url = f"http://127.0.0.1:{emulator_port}"
        if not wait_http_ok(url + "/_emulator/stats", READY_TIMEOUT_S):
            tail_text = tail(emulator.log, 20)
            daemons.stop(EMULATOR)
            raise StackError(f"the emulator did not become ready; its log says:\n{tail_text}")
        emulator = daemons.state(EMULATOR)
    else:
        progress("ANTHROPIC_API_KEY is set: agents will use the real API; no emulator started.")
    return StackInfo(emulator, url, key_file, NOT_YET)


def down(settings: Settings, progress: Callable[[str], None] = print) -> None:
    if _daemons(settings).stop(EMULATOR):
        progress("stopped the Anthropic emulator")
    else:
        progress("the Anthropic emulator was not running")


def status(settings: Settings) -> dict[str, object]:
    state = _daemons(settings).state(EMULATOR)
    return {
        "home": str(settings.home),
        "emulator": {"running": state.running, "pid": state.pid, "log": str(state.log)},
        "not_yet": list(NOT_YET),
    }


def format_status(info: dict[str, object]) -> str:
    return json.dumps(info, indent=2)
