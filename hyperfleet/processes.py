"""Starting and stopping the local servers Hyperfleet runs on one machine: the Anthropic emulator,
a Ray head, redis-server. Used by the local stack, the tests and the benchmarks alike.

Every start waits for readiness with a deadline and every stop signals one process by PID (then
its process group after a grace period): never ``ray stop``, which kills every Ray process on the
machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 45.0
POLL_S = 0.1
PROBE_TIMEOUT_S = 2.0
LOOPBACK = "127.0.0.1"
# A one-machine head (`hyperfleet up`, the tests, the benchmarks) listens on loopback alone.
# Ray 2.60 turns `--node-ip-address=127.0.0.1`, and a driver's `address="127.0.0.1:PORT"`, into
# the machine's interface address (`services.resolve_ip_for_localhost`) unless this variable says
# multi-node clusters are off; with it, the GCS, the raylet and the agents bind 127.0.0.1 only.
# For such a head and its drivers (set before `ray` is imported, which reads it once): a worker
# node refuses to start under it, so the node agent scrubs it.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class StartError(RuntimeError):
    """A server did not become ready; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 30) -> str:
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
        time.sleep(POLL_S)
    return False


def wait_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S):
                return True
        except OSError:
            time.sleep(POLL_S)
    return False


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every live process below ``pid``, as (pid, start time), so a reused pid is not mistaken."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            starts[int(entry.name)] = fields[19]
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, starts[child]))
            todo.append(child)
    return found


def reap_leftovers(leftovers: list[tuple[int, str]], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the processes of ``leftovers`` still alive (same start time).

    Needed because some children leave their parent's process group and outlive it: Ray
    Serve's HAProxy keeps running after its Ray head is stopped."""

    def alive() -> list[int]:
        return [p for p, start in leftovers if (f := _stat(p)) and f[19] == start and f[0] != "Z"]

    for pid in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process, SIGKILL to its group after ``timeout_s``, then any descendant
    that outlived it."""
    if process.poll() is not None:
        return
    tree = descendants(process.pid)
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    reap_leftovers(tree)


def _spawn(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def start_emulator(port: int, api_key: str, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cluster.cli", "emulator", "--port", str(port)]
    process = _spawn([*argv, "--api-key", api_key, *flags], log)
    if not wait_http_ok(f"http://127.0.0.1:{port}/_emulator/stats", READY_TIMEOUT_S):
        stop(process)
        raise StartError(f"the emulator did not start:\n{tail(log)}")
    return process


def start_ray_head(
    port: int, log: Path, num_cpus: int, resources: dict[str, float] | None = None
) -> subprocess.Popen[bytes]:
    """``ray start --head --block`` on 127.0.0.1:``port`` (never 6379's Redis), dashboard off."""
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--node-ip-address={LOOPBACK}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources or {})}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--block",
    ]
    process = _spawn(argv, log, dict(os.environ, **LOOPBACK_RAY_ENV))
    if not wait_port(port, READY_TIMEOUT_S, process):
        stop(process)
        raise StartError(f"the Ray head did not start:\n{tail(log)}")
    return process


def start_redis(port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    """redis-server on loopback, fsyncing every write (what the Redis session store expects)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("redis-server is not installed (Debian: apt-get install redis-server)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    process = _spawn(argv, data_dir / "redis.log")
    if not wait_port(port, READY_TIMEOUT_S, process):
        stop(process)
        raise StartError(f"redis-server did not start:\n{tail(data_dir / 'redis.log')}")
    return process
