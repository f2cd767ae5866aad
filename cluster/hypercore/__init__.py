"""A typed client of Hypercore's cluster API, over gRPC or its HTTP mirror.

The local stand-in that serves the same API lives in `cluster.hypercore_standin`; nothing here
imports it.
"""

from .client import DEFAULT_TIMEOUT_S, SPAWN_TIMEOUT_S, HypercoreClient
from .errors import (
    CapacityExceeded,
    HypercoreError,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    UnknownWorkload,
)
from .models import HostNode, HostState, Spawned, SpawnRequest, Workload
from .transports import GrpcTransport, HttpTransport, Transport

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SPAWN_TIMEOUT_S",
    "CapacityExceeded",
    "GrpcTransport",
    "HostNode",
    "HostState",
    "HttpTransport",
    "HypercoreClient",
    "HypercoreError",
    "HypercoreUnavailable",
    "InvalidSpawnRequest",
    "SpawnRequest",
    "Spawned",
    "Transport",
    "UnknownWorkload",
    "Workload",
]
