"""The pool controller's Ray shell: one detached actor on the head, found by name.

Every ingress replica starts it or finds it (``start_pool_controller``, ``get_if_exists``), so any
deployment that runs the API runs exactly one; Ray restarts it when its process dies
(``max_restarts=-1``), and it resumes from the control store (``pool.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors import RuntimeConfig
from hyperfleet import logs
from hyperfleet.names import NAMESPACE, POOL_ACTOR_NAME
from serve_app.backend import HEAD_RESOURCE, Control
from serve_app.replicas import Replicas

from .pool import PoolController
from .pool_config import PoolConfig

logger = logging.getLogger(__name__)


async def _request_resources(slots: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    await asyncio.to_thread(request_resources, bundles=slots)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class PoolControllerActor:
    def __init__(self, config: PoolConfig, runtime: RuntimeConfig) -> None:
        logs.configure("pool-controller")
        self.controller = PoolController(Control(), Replicas(runtime), config, _request_resources)
        # An async actor's __init__ runs on its event loop: the loop starts with the actor.
        self._loop = asyncio.get_running_loop().create_task(self.controller.run())

    async def ping(self) -> str:
        return "ok"

    async def configure(self, config: PoolConfig, runtime: RuntimeConfig) -> None:
        """The settings of the ingress that started last (a redeploy's): new replicas start
        with its runtime, and the next tick uses its pool settings."""
        self.controller.config = config
        self.controller.replicas.runtime = runtime

    async def request_capacity(self, agent_id: str, wait_s: float | None = None) -> bool:
        return await self.controller.request_capacity(agent_id, wait_s)

    async def tick(self) -> None:
        """One tick now (tests and ``hyperfleet`` tooling; the loop ticks on its own)."""
        await self.controller.tick()

    async def status(self) -> dict[str, Any]:
        return {agent_id: vars(s) for agent_id, s in self.controller.status.items()}


def start_pool_controller(config: PoolConfig, runtime: RuntimeConfig) -> Any:
    """Starts (or finds) the pool controller on the head and gives it these settings (one found
    running may have another ingress's); returns its handle."""
    handle = PoolControllerActor.options(  # type: ignore[attr-defined]
        name=POOL_ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        resources={HEAD_RESOURCE: 0.001},
    ).remote(config, runtime)
    handle.configure.remote(config, runtime)  # not awaited: the ingress starts meanwhile
    return handle
