"""Runs the emulator under uvicorn with uvloop and httptools."""

from __future__ import annotations

import logging

import uvicorn

from .app import Emulator, install_log_filter
from .config import EmulatorConfig

# A listen backlog large enough for a benchmark opening 1,000+ connections at once.
LISTEN_BACKLOG = 8192
KEEP_ALIVE_S = 75


def serve(config: EmulatorConfig) -> None:
    """Serves until SIGINT or SIGTERM."""
    install_log_filter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger(__name__).info("emulator listening on http://%s:%d", config.host, config.port)
    uvicorn.run(
        Emulator(config),
        host=config.host,
        port=config.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
