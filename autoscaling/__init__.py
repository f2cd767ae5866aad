"""Capacity: the agent pools' controller (replicas follow session load) and
``HypercoreNodeProvider`` (Ray's autoscaler on Hypercore workloads, VMs follow replicas).

Names load on first use (PEP 562), so the ingress, which starts the pool controller, does not
import the provider's gRPC client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .command_runner import HeadStartError, HypercoreCommandRunner, NoRemoteExecutionError
    from .pool_actor import PoolControllerActor, start_pool_controller
    from .pool_config import PoolConfig, complete_spec
    from .pool_policy import Decision, Observation, PoolPolicy, PoolState, decide
    from .provider import HypercoreNodeProvider, NodeLaunchError
    from .provider_config import NodeConfig, ProviderConfig, ProviderConfigError
    from .ray_nodes import RayNodeTable

_SOURCES = {
    "Decision": ".pool_policy",
    "HeadStartError": ".command_runner",
    "HypercoreCommandRunner": ".command_runner",
    "HypercoreNodeProvider": ".provider",
    "NoRemoteExecutionError": ".command_runner",
    "NodeConfig": ".provider_config",
    "NodeLaunchError": ".provider",
    "Observation": ".pool_policy",
    "PoolConfig": ".pool_config",
    "PoolControllerActor": ".pool_actor",
    "PoolPolicy": ".pool_policy",
    "PoolState": ".pool_policy",
    "ProviderConfig": ".provider_config",
    "ProviderConfigError": ".provider_config",
    "RayNodeTable": ".ray_nodes",
    "complete_spec": ".pool_config",
    "decide": ".pool_policy",
    "start_pool_controller": ".pool_actor",
}

__all__ = [
    "Decision",
    "HeadStartError",
    "HypercoreCommandRunner",
    "HypercoreNodeProvider",
    "NoRemoteExecutionError",
    "NodeConfig",
    "NodeLaunchError",
    "Observation",
    "PoolConfig",
    "PoolControllerActor",
    "PoolPolicy",
    "PoolState",
    "ProviderConfig",
    "ProviderConfigError",
    "RayNodeTable",
    "complete_spec",
    "decide",
    "start_pool_controller",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source, __name__), name)
    globals()[name] = value
    return value
