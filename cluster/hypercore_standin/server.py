"""Running the stand-in: the gRPC server, the HTTP mirror and the cache refresher on one loop.

SIGTERM or SIGINT stops both servers and then every workload (SIGTERM, 5 s, SIGKILL), so a
stopped stand-in leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .catalog import ImageCatalog
from .host import Host
from .service import grpc_handler, http_mirror

logger = logging.getLogger(__name__)

DEFAULT_REFRESH_INTERVAL_S = 5.0  # Hypercore's WorkloadBroadcastPeriod
DEFAULT_BASE_URL = "example.com"  # Hypercore's --cluster-base-url default
GRPC_STOP_GRACE_S = 2.0
HTTP_STOP_TIMEOUT_S = 5.0


class StandinConfig(BaseModel):
    """The stand-in's settings, validated where the command line hands them over."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    grpc_bind_addr: str
    http_bind_addr: str
    catalog: ImageCatalog
    state_dir: Path
    refresh_interval_s: float = Field(default=DEFAULT_REFRESH_INTERVAL_S, gt=0, le=3600)
    base_url: str = Field(default=DEFAULT_BASE_URL, min_length=1)

    @field_validator("grpc_bind_addr", "http_bind_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value


class _HttpServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The stand-in handles SIGTERM/SIGINT itself: it must stop its workloads, not just exit.
        yield


async def _refresh_forever(host: Host, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await host.refresh()
        except Exception:
            # A supervisory loop: one failed refresh must not freeze List and respawns for good.
            logger.exception("refresh failed; retrying next interval")


async def _serve(config: StandinConfig) -> int:
    host = Host(config.catalog, config.state_dir, config.base_url)
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((grpc_handler(host),))
    if grpc_server.add_insecure_port(config.grpc_bind_addr) == 0:
        logger.error("cannot bind gRPC to %s", config.grpc_bind_addr)
        return 1
    await grpc_server.start()
    http_host, _, http_port = config.http_bind_addr.rpartition(":")
    http_server = _HttpServer(
        uvicorn.Config(
            http_mirror(host),
            host=http_host.strip("[]"),
            port=int(http_port),
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
    )
    http_task = asyncio.create_task(http_server.serve())
    refresher = asyncio.create_task(_refresh_forever(host, config.refresh_interval_s))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    logger.info(
        "Hypercore stand-in %s: gRPC on %s, HTTP on %s, state in %s",
        host.name,
        config.grpc_bind_addr,
        config.http_bind_addr,
        config.state_dir,
    )
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait({stop_wait, http_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0 if stopping.is_set() else 1  # the HTTP server ended by itself: it could not bind
    stop_wait.cancel()
    refresher.cancel()
    http_server.should_exit = True
    await grpc_server.stop(GRPC_STOP_GRACE_S)
    await host.shutdown()
    with contextlib.suppress(TimeoutError, SystemExit):
        await asyncio.wait_for(http_task, HTTP_STOP_TIMEOUT_S)
    logger.info("Hypercore stand-in stopped")
    return code


def serve(config: StandinConfig) -> int:
    """Runs the stand-in until SIGTERM or SIGINT; returns the process exit code."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_serve(config))
