"""A ``SessionStore`` that times its commits and counts its failures (``actors/metrics.py``).

A replica wraps its store in one (``AgentActor``), so every backend is measured from where it is
used: ``actor`` includes the Ray hop to the store actor, as a turn waits for it. Failures are
counted by kind: ``stale`` (a fenced commit lost), ``conflict`` (an id or idempotency key taken),
``unavailable`` (``StoreError``: the backend could not be reached or failed).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from hyperfleet.errors import ConflictError, StaleSessionError, StoreError
from hyperfleet.metering import UsageRecord

from .. import metrics
from .base import SessionRecord, SessionStore, TurnRecord

T = TypeVar("T")


def store_error(error: BaseException) -> metrics.StoreError | None:
    """A store call's failure kind; None for an answer that is not a failure (not found)."""
    if isinstance(error, StaleSessionError):
        return "stale"
    if isinstance(error, ConflictError):
        return "conflict"
    if isinstance(error, StoreError):
        return "unavailable"
    return None


class MeteredStore:
    """``store``, measured; every call is the wrapped store's."""

    def __init__(self, store: SessionStore) -> None:
        self.inner = store
        self.label = metrics.store_label(store)

    async def _counted(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as e:
            kind = store_error(e)
            if kind is not None:
                metrics.store_failed(self.label, kind)
            raise

    async def create_session(self, record: SessionRecord) -> None:
        await self._counted(self.inner.create_session(record))

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return await self._counted(self.inner.get_session(session_id))

    async def commit_turn(
        self, turn: TurnRecord, expected_version: int, usage: UsageRecord | None = None
    ) -> None:
        started = time.monotonic()
        await self._counted(self.inner.commit_turn(turn, expected_version, usage))
        metrics.store_committed(self.label, time.monotonic() - started)

    async def record_usage(self, record: UsageRecord) -> None:
        await self._counted(self.inner.record_usage(record))

    async def unmetered_usage(self, before: float, limit: int) -> list[UsageRecord]:
        return await self._counted(self.inner.unmetered_usage(before, limit))

    async def ack_usage(self, ids: list[str]) -> None:
        await self._counted(self.inner.ack_usage(ids))

    async def find_turn(self, session_id: str, idempotency_key: str) -> TurnRecord | None:
        return await self._counted(self.inner.find_turn(session_id, idempotency_key))

    async def get_turn(self, session_id: str, turn_id: str) -> TurnRecord | None:
        return await self._counted(self.inner.get_turn(session_id, turn_id))

    async def reserve_seq(self, session_id: str, count: int) -> int:
        return await self._counted(self.inner.reserve_seq(session_id, count))

    async def list_turns(
        self, session_id: str, after: int = 0, limit: int | None = None
    ) -> list[TurnRecord]:
        return await self._counted(self.inner.list_turns(session_id, after, limit))

    async def close_session(self, session_id: str) -> None:
        await self._counted(self.inner.close_session(session_id))

    async def ping(self) -> None:
        await self._counted(self.inner.ping())
