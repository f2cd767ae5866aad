"""Agent replicas: Ray actors hosting durable, tool-using Claude sessions.

The surface is imported lazily (PEP 562): ``actors.spec`` alone must not
pull in Ray and the Anthropic SDK, because the node agent (a VM's entrypoint) uses them and
should start in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyperfleet.errors import (
        CapacityError,
        CircuitOpenError,
        HyperfleetError,
        IdempotencyConflictError,
        InvalidRequestError,
        NotFoundError,
        SessionBusyError,
        StaleSessionError,
        StoreError,
        UpstreamError,
    )

    from .actor import (
        NAMESPACE,
        AgentActor,
        RuntimeConfig,
        build_host,
        replica_name,
        spawn_replica,
    )
    from .breaker import CircuitBreaker
    from .host import SessionHost
    from .loop import AgentLoop, LoopConfig
    from .pricing import Usage, price_of
    from .spec import AgentSpec, Replicas, Resources, ToolLimits, placement_options
    from .store import RedisSessionStore, SessionStore, SqliteSessionStore, open_store
    from .store.actor import start_on_head, start_store_actor

_SOURCES = {
    "CapacityError": "hyperfleet.errors",
    "CircuitOpenError": "hyperfleet.errors",
    "HyperfleetError": "hyperfleet.errors",
    "IdempotencyConflictError": "hyperfleet.errors",
    "InvalidRequestError": "hyperfleet.errors",
    "NotFoundError": "hyperfleet.errors",
    "SessionBusyError": "hyperfleet.errors",
    "StaleSessionError": "hyperfleet.errors",
    "StoreError": "hyperfleet.errors",
    "UpstreamError": "hyperfleet.errors",
    "AgentActor": ".actor",
    "build_host": ".actor",
    "AgentLoop": ".loop",
    "AgentSpec": ".spec",
    "CircuitBreaker": ".breaker",
    "LoopConfig": ".loop",
    "NAMESPACE": ".actor",
    "RedisSessionStore": ".store",
    "Replicas": ".spec",
    "Resources": ".spec",
    "RuntimeConfig": ".actor",
    "SessionHost": ".host",
    "SessionStore": ".store",
    "SqliteSessionStore": ".store",
    "ToolLimits": ".spec",
    "Usage": ".pricing",
    "open_store": ".store",
    "placement_options": ".spec",
    "price_of": ".pricing",
    "replica_name": ".actor",
    "spawn_replica": ".actor",
    "start_on_head": ".store.actor",
    "start_store_actor": ".store.actor",
}

__all__ = [
    "NAMESPACE",
    "AgentActor",
    "AgentLoop",
    "AgentSpec",
    "CapacityError",
    "CircuitBreaker",
    "CircuitOpenError",
    "HyperfleetError",
    "IdempotencyConflictError",
    "InvalidRequestError",
    "LoopConfig",
    "NotFoundError",
    "RedisSessionStore",
    "Replicas",
    "Resources",
    "RuntimeConfig",
    "SessionBusyError",
    "SessionHost",
    "SessionStore",
    "SqliteSessionStore",
    "StaleSessionError",
    "StoreError",
    "ToolLimits",
    "UpstreamError",
    "Usage",
    "build_host",
    "open_store",
    "placement_options",
    "price_of",
    "replica_name",
    "spawn_replica",
    "start_on_head",
    "start_store_actor",
]


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
