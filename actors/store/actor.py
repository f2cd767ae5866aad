"""The SQLite store behind a Ray actor pinned to the head node, so replicas on any node reach it.

The actor is detached and named (``session-store`` in namespace ``hyperfleet``), restarted by Ray
if its process dies (the file is the state; a restart reopens it). Its methods are not retried by
Ray: a commit whose reply was lost is retried by the caller, and the version fence makes that
safe. ``ActorSessionStore`` is the ``SessionStore`` a replica holds: each call is one actor call,
bounded by a timeout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from hyperfleet import logs
from hyperfleet.errors import StoreError
from hyperfleet.metering import UsageRecord
from hyperfleet.names import NAMESPACE

from .base import SessionRecord, TurnRecord
from .sqlite import SqliteSessionStore

STORE_ACTOR_NAME = "session-store"
CALL_TIMEOUT_S = 10.0
HEAD_RESOURCE = "node:__internal_head__"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class SessionStoreActor:
    def __init__(self, path: str) -> None:
        logs.configure("session-store")
        self._store = SqliteSessionStore(Path(path))

    async def create_session(self, record: SessionRecord) -> None:
        await self._store.create_session(record)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return await self._store.get_session(session_id)

    async def commit_turn(
        self, turn: TurnRecord, expected_version: int, usage: UsageRecord | None = None
    ) -> None:
        await self._store.commit_turn(turn, expected_version, usage)

    async def record_usage(self, record: UsageRecord) -> None:
        await self._store.record_usage(record)

    async def unmetered_usage(self, before: float, limit: int) -> list[UsageRecord]:
        return await self._store.unmetered_usage(before, limit)

    async def ack_usage(self, ids: list[str]) -> None:
        await self._store.ack_usage(ids)

    async def find_turn(self, session_id: str, key: str) -> TurnRecord | None:
        return await self._store.find_turn(session_id, key)

    async def get_turn(self, session_id: str, turn_id: str) -> TurnRecord | None:
        return await self._store.get_turn(session_id, turn_id)

    async def reserve_seq(self, session_id: str, count: int) -> int:
        return await self._store.reserve_seq(session_id, count)

    async def list_turns(self, session_id: str, after: int, limit: int | None) -> list[TurnRecord]:
        return await self._store.list_turns(session_id, after, limit)

    async def close_session(self, session_id: str) -> None:
        await self._store.close_session(session_id)

    async def ping(self) -> str:
        await self._store.ping()
        return str(self._store.path)


def start_on_head(actor_class: Any, name: str, path: Path, *args: Any) -> Any:
    """Starts (or finds) a detached, named actor on the head node, where its file lives;
    ``args`` follow the path in its constructor."""
    return actor_class.options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        resources={HEAD_RESOURCE: 0.001},
    ).remote(str(path), *args)


def start_store_actor(path: Path) -> Any:
    """Starts (or finds) the session-store actor on the head node; returns its handle."""
    return start_on_head(SessionStoreActor, STORE_ACTOR_NAME, path)


class ActorSessionStore:
    """``SessionStore`` over the store actor."""

    def __init__(self, handle: Any = None, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    def _actor(self) -> Any:
        if self._handle is None:
            self._handle = ray.get_actor(STORE_ACTOR_NAME, namespace=NAMESPACE)
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            ref = getattr(self._actor(), method).remote(*args)
            return await asyncio.wait_for(ref, self._timeout_s)
        except (TimeoutError, GetTimeoutError) as e:
            raise StoreError(f"session store did not answer {method} in {self._timeout_s} s") from e
        except (RayActorError, ValueError) as e:
            raise StoreError(f"session store unreachable: {e}") from e

    async def create_session(self, record: SessionRecord) -> None:
        await self._call("create_session", record)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        result: SessionRecord | None = await self._call("get_session", session_id)
        return result

    async def commit_turn(
        self, turn: TurnRecord, expected_version: int, usage: UsageRecord | None = None
    ) -> None:
        await self._call("commit_turn", turn, expected_version, usage)

    async def record_usage(self, record: UsageRecord) -> None:
        await self._call("record_usage", record)

    async def unmetered_usage(self, before: float, limit: int) -> list[UsageRecord]:
        records: list[UsageRecord] = await self._call("unmetered_usage", before, limit)
        return records

    async def ack_usage(self, ids: list[str]) -> None:
        await self._call("ack_usage", ids)

    async def find_turn(self, session_id: str, idempotency_key: str) -> TurnRecord | None:
        result: TurnRecord | None = await self._call("find_turn", session_id, idempotency_key)
        return result

    async def get_turn(self, session_id: str, turn_id: str) -> TurnRecord | None:
        result: TurnRecord | None = await self._call("get_turn", session_id, turn_id)
        return result

    async def reserve_seq(self, session_id: str, count: int) -> int:
        top: int = await self._call("reserve_seq", session_id, count)
        return top

    async def list_turns(
        self, session_id: str, after: int = 0, limit: int | None = None
    ) -> list[TurnRecord]:
        result: list[TurnRecord] = await self._call("list_turns", session_id, after, limit)
        return result

    async def close_session(self, session_id: str) -> None:
        await self._call("close_session", session_id)

    async def ping(self) -> None:
        await self._call("ping")
