"""Hypercore: a typed client of its cluster API (gRPC or the HTTP mirror), and a faithful local
stand-in that runs workloads as local process trees."""

from .catalog import CatalogError, Image, ImageCatalog
from .client import DEFAULT_TIMEOUT_S, SPAWN_TIMEOUT_S, HypercoreClient
from .errors import (
    CapacityExceeded,
    HypercoreError,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    UnknownWorkload,
)
from .launcher import StandinHandle, start_standin
from .models import HostNode, HostState, Spawned, SpawnRequest, Workload
from .transports import GrpcTransport, HttpTransport, Transport

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SPAWN_TIMEOUT_S",
    "CapacityExceeded",
    "CatalogError",
    "GrpcTransport",
    "HostNode",
    "HostState",
    "HttpTransport",
    "HypercoreClient",
    "HypercoreError",
    "HypercoreUnavailable",
    "Image",
    "ImageCatalog",
    "InvalidSpawnRequest",
    "SpawnRequest",
    "Spawned",
    "StandinHandle",
    "Transport",
    "UnknownWorkload",
    "Workload",
    "start_standin",
]
