"""Durable sessions: the ``SessionStore`` contract and its SQLite and Redis implementations."""

from __future__ import annotations

from pathlib import Path

from .base import SessionRecord, SessionStore, TurnRecord
from .redis import RedisSessionStore
from .sqlite import SqliteSessionStore

__all__ = [
    "RedisSessionStore",
    "SessionRecord",
    "SessionStore",
    "SqliteSessionStore",
    "TurnRecord",
    "open_store",
]


def open_store(url: str) -> SessionStore:
    """A store from its URL: ``ray://session-store`` (the head's store actor, the default),
    ``sqlite:///path/file.db`` (in this process) or ``redis://host:port/db``."""
    if url.startswith("ray://"):
        from .actor import ActorSessionStore

        return ActorSessionStore()
    if url.startswith("sqlite://"):
        return SqliteSessionStore(Path(url.removeprefix("sqlite://")))
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisSessionStore(url)
    raise ValueError(f"unknown session store URL {url!r}: use ray://, sqlite:// or redis://")
