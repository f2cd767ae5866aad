"""Starting the Hypercore stand-in as a subprocess on free loopback ports, for tests, benchmarks
and the local stack."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from cluster.hypercore.client import DEFAULT_TIMEOUT_S, HypercoreClient
from hyperfleet.processes import StartError, free_port, spawn, stop, tail, wait_port

from .catalog import ImageCatalog
from .server import DEFAULT_REFRESH_INTERVAL_S

READY_TIMEOUT_S = 60.0
# The stand-in stops its workloads on SIGTERM, each within 5 s of grace, all at once.
STOP_GRACE_S = 30.0


@dataclass
class StandinHandle:
    """A running stand-in: where it listens, its process, its log and state directory."""

    grpc_address: str
    http_address: str
    process: subprocess.Popen[bytes]
    log: Path
    state_dir: Path

    def client(
        self, transport: Literal["grpc", "http"] = "grpc", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> HypercoreClient:
        """A client of this stand-in over ``transport``."""
        address = self.grpc_address if transport == "grpc" else self.http_address
        return HypercoreClient.connect(address, transport=transport, timeout_s=timeout_s)

    def stop(self) -> None:
        """SIGTERM (the stand-in then stops its workloads), SIGKILL after ``STOP_GRACE_S``."""
        stop(self.process, STOP_GRACE_S)

    def __enter__(self) -> StandinHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_standin(
    log_dir: Path,
    *,
    refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S,
    catalog: ImageCatalog | Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> StandinHandle:
    """Starts ``hyperfleet hypercore serve`` on free 127.0.0.1 ports and waits until both answer.

    Args:
        log_dir: gets ``standin.log``, the workloads' state (``state/``) and, for a catalog
            given as an object, ``catalog.json``.
        refresh_interval_s: how often the cached List state is rebuilt.
        catalog: an image catalog file or object; None for the default catalog.
        ready_timeout_s: how long to wait for both ports.

    Raises:
        StartError: the stand-in exited or did not listen in time; the message ends with its log.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    catalog_file: Path | None = catalog if not isinstance(catalog, ImageCatalog) else None
    if isinstance(catalog, ImageCatalog):
        catalog_file = log_dir / "catalog.json"
        catalog_file.write_text(catalog.to_json())
    grpc_port, http_port = free_port(), free_port()
    state_dir = log_dir / "state"
    argv = [sys.executable, "-m", "cluster.cli", "hypercore", "serve"]
    argv += ["--grpc-bind-addr", f"127.0.0.1:{grpc_port}"]
    argv += ["--http-bind-addr", f"127.0.0.1:{http_port}"]
    argv += ["--refresh-interval-s", str(refresh_interval_s), "--state-dir", str(state_dir)]
    if catalog_file is not None:
        argv += ["--image-catalog", str(catalog_file)]
    log = log_dir / "standin.log"
    process = spawn(argv, log=log)
    deadline = time.monotonic() + ready_timeout_s
    for port in (grpc_port, http_port):
        if not wait_port(port, max(0.0, deadline - time.monotonic()), process):
            stop(process, STOP_GRACE_S)
            raise StartError(f"the Hypercore stand-in did not start:\n{tail(log)}")
    return StandinHandle(
        f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", process, log, state_dir
    )
