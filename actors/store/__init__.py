"""Durable sessions: the ``SessionStore`` contract and its SQLite and Redis implementations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import SessionRecord, SessionStore, TurnRecord
from .sqlite import SqliteSessionStore

if TYPE_CHECKING:
    from .redis import RedisSessionStore

__all__ = [
    "RedisSessionStore",
    "SessionRecord",
    "SessionStore",
    "SqliteSessionStore",
    "TurnRecord",
    "open_store",
]


def __getattr__(name: str) -> Any:
    # The redis client costs a replica 0.1 s to import; only Redis-backed replicas pay it.
    if name == "RedisSessionStore":
        from .redis import RedisSessionStore

        return RedisSessionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str) -> SessionStore:
    """A store from its URL: ``ray://session-store`` (the head's store actor, the default),
    ``sqlite:///path/file.db`` (in this process) or ``redis://host:port/db``."""
    if url.startswith("ray://"):
        from .actor import ActorSessionStore

        return ActorSessionStore()
    if url.startswith("sqlite://"):
        return SqliteSessionStore(Path(url.removeprefix("sqlite://")))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisSessionStore

        return RedisSessionStore(url)
    raise ValueError(f"unknown session store URL {url!r}: use ray://, sqlite:// or redis://")
