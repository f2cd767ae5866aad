"""``HypercoreNodeProvider``: Ray's autoscaler on Hypercore workloads, and its command runner."""

from .command_runner import HeadStartError, HypercoreCommandRunner, NoRemoteExecutionError
from .provider import HypercoreNodeProvider, NodeLaunchError
from .provider_config import NodeConfig, ProviderConfig, ProviderConfigError
from .ray_nodes import RayNodeTable

__all__ = [
    "HeadStartError",
    "HypercoreCommandRunner",
    "HypercoreNodeProvider",
    "NoRemoteExecutionError",
    "NodeConfig",
    "NodeLaunchError",
    "ProviderConfig",
    "ProviderConfigError",
    "RayNodeTable",
]
