"""Agent replicas: Ray actors hosting durable, tool-using Claude sessions."""

from __future__ import annotations

from .actor import NAMESPACE, AgentActor, RuntimeConfig, replica_name, spawn_replica
from .breaker import CircuitBreaker
from .errors import (
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
from .host import SessionHost
from .loop import AgentLoop, LoopConfig
from .pricing import Usage, price_of
from .spec import AgentSpec, Replicas, Resources, placement_options
from .store import RedisSessionStore, SessionStore, SqliteSessionStore, open_store
from .store.actor import start_on_head, start_store_actor

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
    "UpstreamError",
    "Usage",
    "open_store",
    "placement_options",
    "price_of",
    "replica_name",
    "spawn_replica",
    "start_on_head",
    "start_store_actor",
]
