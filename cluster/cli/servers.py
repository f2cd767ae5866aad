"""The local servers Hyperfleet runs on one machine: the Anthropic emulator, a Ray head and
redis-server (Prometheus's command line is ``cluster.observability.prometheus``'s).
``hyperfleet up`` runs them as daemons (``stack``), the tests and the benchmarks as children
(``start_*``); both build their command lines here, so the two cannot drift.

Every start waits for readiness with a deadline, and every stop is
``hyperfleet.processes.stop``: one process by its pid, then its group; never ``ray stop``, which
kills every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from hyperfleet.private import PRIVATE_UMASK, private_dir
from hyperfleet.processes import StartError, spawn, stop, tail, wait_http_ok, wait_port

READY_TIMEOUT_S = 60.0
LOOPBACK = "127.0.0.1"
# A one-machine head (`hyperfleet up`, the tests, the benchmarks) listens on loopback alone.
# Ray 2.60 turns `--node-ip-address=127.0.0.1`, and a driver's `address="127.0.0.1:PORT"`, into
# the machine's interface address (`services.resolve_ip_for_localhost`) unless this variable says
# multi-node clusters are off; with it, the GCS, the raylet and the agents bind 127.0.0.1 only.
# For such a head and its drivers (set before `ray` is imported, which reads it once): a worker
# node refuses to start under it, so the node agent scrubs it.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# For every head: uvicorn, in Serve's proxy and in each replica's own HTTP port, replaces the TCP
# peer with X-Forwarded-For sent from FORWARDED_ALLOW_IPS (by default 127.0.0.1, where Serve's
# HAProxy and every local process connect from) unless it is empty; the ingress finds the client
# itself (serve_app/client_address.py).
NODE_RAY_ENV = {"FORWARDED_ALLOW_IPS": ""}


def emulator_argv(port: int) -> list[str]:
    """``hyperfleet emulator`` on 127.0.0.1:``port``; its API key comes as a flag or from env."""
    return [sys.executable, "-m", "cluster.cli", "emulator", "--port", str(port)]


def ray_head_argv(
    port: int,
    num_cpus: int,
    resources: Mapping[str, float] | None = None,
    dashboard_port: int | None = None,
) -> list[str]:
    """``ray start --head --block`` on 127.0.0.1:``port`` (never 6379's Redis), with its
    dashboard on 127.0.0.1:``dashboard_port``, or none (the tests' and benchmarks' heads: the
    dashboard costs a head ~10 processes and their memory, docs/observability.md). Run it with
    ``LOOPBACK_RAY_ENV``, which keeps it on loopback."""
    if dashboard_port is None:
        dashboard = ["--include-dashboard=false"]
    else:  # an explicit port: a taken one fails the dashboard rather than moving it
        dashboard = [
            "--include-dashboard=true",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={dashboard_port}",
        ]
    return [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--node-ip-address={LOOPBACK}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources or {})}",
        *dashboard,
        "--disable-usage-stats",
        "--block",
    ]


def redis_argv(binary: str, port: int, data_dir: Path) -> list[str]:
    """redis-server on loopback, fsyncing every write (what the Redis session store expects).
    Run it with ``PRIVATE_UMASK`` in a ``private_dir``: Redis has no setting for the mode of its
    files (the append-only log holds every committed turn), so its umask makes them 0600."""
    argv = [binary, "--port", str(port), "--bind", LOOPBACK, "--dir", str(data_dir)]
    return [*argv, "--save", "", "--appendonly", "yes", "--appendfsync", "always"]


def start_emulator(port: int, api_key: str, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    """The emulator as a child, once it answers.

    Raises:
        StartError: it did not answer within ``READY_TIMEOUT_S``; the message ends with its log.
    """
    process = spawn([*emulator_argv(port), "--api-key", api_key, *flags], log=log)
    if not wait_http_ok(f"http://{LOOPBACK}:{port}/_emulator/stats", READY_TIMEOUT_S):
        stop(process)
        raise StartError(f"the emulator did not start:\n{tail(log)}")
    return process


def start_ray_head(
    port: int, log: Path, num_cpus: int, resources: Mapping[str, float] | None = None
) -> subprocess.Popen[bytes]:
    """A Ray head (``ray_head_argv``) as a child, once its GCS port accepts connections.

    Raises:
        StartError: it exited or did not listen within ``READY_TIMEOUT_S``.
    """
    argv = ray_head_argv(port, num_cpus, resources)
    process = spawn(argv, env=dict(os.environ, **LOOPBACK_RAY_ENV, **NODE_RAY_ENV), log=log)
    if not wait_port(port, READY_TIMEOUT_S, process):
        stop(process)
        raise StartError(f"the Ray head did not start:\n{tail(log)}")
    return process


def start_redis(port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    """redis-server (``redis_argv``) as a child, its log in ``data_dir``, once it listens.

    Raises:
        StartError: it is not installed, exited, or did not listen within ``READY_TIMEOUT_S``.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("redis-server is not installed (Debian: apt-get install redis-server)")
    log = private_dir(data_dir) / "redis.log"
    process = spawn(redis_argv(binary, port, data_dir), log=log, umask=PRIVATE_UMASK)
    if not wait_port(port, READY_TIMEOUT_S, process):
        stop(process)
        raise StartError(f"redis-server did not start:\n{tail(log)}")
    return process
