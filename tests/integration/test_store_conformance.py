"""One conformance suite for every SessionStore: SQLite in-process, SQLite behind the head-pinned
store actor (real Ray), and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from actors.store import RedisSessionStore, SessionStore, SqliteSessionStore
from actors.store.actor import ActorSessionStore, SessionStoreActor
from actors.store.base import SessionRecord, TurnRecord
from hyperfleet.errors import (
    ConflictError,
    IdempotencyConflictError,
    NotFoundError,
    StaleSessionError,
)
from hyperfleet.metering import Reservation, UsageRecord

from .conftest import RedisServer


@pytest.fixture(params=["sqlite", "redis", "ray-actor"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "sqlite":
        sqlite = SqliteSessionStore(tmp_path / "s.db")
        yield sqlite
        sqlite.close()
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_store = RedisSessionStore(server.url)
        yield redis_store
        await redis_store.aclose()
    else:
        request.getfixturevalue("ray_cluster")
        import ray

        actor = SessionStoreActor.options(  # type: ignore[attr-defined]
            resources={"node:__internal_head__": 0.001}
        ).remote(str(tmp_path / "actor.db"))
        yield ActorSessionStore(actor)
        ray.kill(actor)


def _session(owner: str = "alice") -> SessionRecord:
    return SessionRecord("ses_" + uuid.uuid4().hex, "agent-1", owner, time.time())


def _turn(session_id: str, index: int, key: str | None = None, text: str = "hi") -> TurnRecord:
    return TurnRecord(
        session_id=session_id,
        index=index,
        turn_id=f"turn_{index}_{uuid.uuid4().hex[:6]}",
        request_digest=f"digest-{text}",
        messages=[
            {"role": "user", "content": text},
            {"role": "assistant", "content": [{"type": "text", "text": f"re: {text}"}]},
        ],
        stop_reason="end_turn",
        usage={"input_tokens": 3, "output_tokens": 4},
        cost_usd=0.001,
        model="claude-sonnet-5-5",
        created_at=time.time(),
        last_seq=index * 3,
        idempotency_key=key,
        content=[{"type": "text", "text": f"re: {text}"}],
        events=[{"type": "turn_end", "seq": index * 3, "data": {"index": index}}],
    )


async def test_create_and_get(store: SessionStore) -> None:
    record = _session()
    await store.create_session(record)
    assert await store.get_session(record.session_id) == record
    assert await store.get_session("ses_missing") is None
    with pytest.raises(ConflictError):
        await store.create_session(record)


async def test_commits_are_ordered_and_fenced(store: SessionStore) -> None:
    record = _session()
    await store.create_session(record)
    sid = record.session_id
    await store.commit_turn(_turn(sid, 1, text="one"), expected_version=0)
    await store.commit_turn(_turn(sid, 2, text="two"), expected_version=1)
    with pytest.raises(StaleSessionError):
        await store.commit_turn(_turn(sid, 2, text="stale"), expected_version=1)
    with pytest.raises(StaleSessionError):
        await store.commit_turn(_turn(sid, 4, text="gap"), expected_version=3)
    turns = await store.list_turns(sid)
    assert [t.messages[0]["content"] for t in turns] == ["one", "two"]
    session = await store.get_session(sid)
    assert session is not None and session.version == 2


async def test_a_committed_turn_round_trips_whole(store: SessionStore) -> None:
    record = _session()
    await store.create_session(record)
    turn = _turn(record.session_id, 1, key="k")
    await store.commit_turn(turn, expected_version=0)
    assert (await store.list_turns(record.session_id)) == [turn]
    assert await store.find_turn(record.session_id, "k") == turn
    assert await store.find_turn(record.session_id, "other") is None
    assert await store.get_turn(record.session_id, turn.turn_id) == turn
    assert await store.get_turn(record.session_id, "turn_missing") is None
    assert await store.get_turn("ses_missing", turn.turn_id) is None


async def test_event_id_reservations_never_overlap(store: SessionStore) -> None:
    record = replace(_session(), seq_reserved=100)
    await store.create_session(record)
    sid = record.session_id
    assert (await store.get_session(sid)) == record
    tops = await asyncio.gather(*(store.reserve_seq(sid, 50) for _ in range(8)))
    # Eight concurrent owners got eight disjoint ranges above the one the opener took.
    assert sorted(tops) == [100 + 50 * i for i in range(1, 9)]
    stored = await store.get_session(sid)
    assert stored is not None and stored.seq_reserved == 500
    with pytest.raises(NotFoundError):
        await store.reserve_seq("ses_missing", 1)
    await store.close_session(sid)
    with pytest.raises(NotFoundError):
        await store.reserve_seq(sid, 1)


async def test_concurrent_commits_from_one_version_admit_one(store: SessionStore) -> None:
    record = _session()
    await store.create_session(record)
    results = await asyncio.gather(
        *(
            store.commit_turn(_turn(record.session_id, 1, text=f"racer {i}"), expected_version=0)
            for i in range(10)
        ),
        return_exceptions=True,
    )
    assert sum(1 for r in results if r is None) == 1
    assert all(isinstance(r, StaleSessionError) for r in results if r is not None)
    assert len(await store.list_turns(record.session_id)) == 1


async def test_idempotency_key_is_unique_per_session(store: SessionStore) -> None:
    record = _session()
    await store.create_session(record)
    await store.commit_turn(_turn(record.session_id, 1, key="same"), expected_version=0)
    with pytest.raises(IdempotencyConflictError):
        await store.commit_turn(_turn(record.session_id, 2, key="same"), expected_version=1)
    other = _session()
    await store.create_session(other)
    await store.commit_turn(_turn(other.session_id, 1, key="same"), expected_version=0)


async def test_pagination(store: SessionStore) -> None:
    record = _session()
    await store.create_session(record)
    for i in range(1, 8):
        await store.commit_turn(_turn(record.session_id, i), expected_version=i - 1)
    page = await store.list_turns(record.session_id, after=2, limit=3)
    assert [t.index for t in page] == [3, 4, 5]
    assert [t.index for t in await store.list_turns(record.session_id, after=5)] == [6, 7]


async def test_closed_sessions_keep_transcripts_and_take_no_commit(store: SessionStore) -> None:
    record = _session()
    await store.create_session(record)
    await store.commit_turn(_turn(record.session_id, 1), expected_version=0)
    await store.close_session(record.session_id)
    await store.close_session(record.session_id)
    await store.close_session("ses_never_existed")
    closed = await store.get_session(record.session_id)
    assert closed is not None and closed.closed
    assert len(await store.list_turns(record.session_id)) == 1
    with pytest.raises(NotFoundError):
        await store.commit_turn(_turn(record.session_id, 2), expected_version=1)
    with pytest.raises(NotFoundError):
        await store.commit_turn(_turn("ses_unknown", 1), expected_version=0)


async def test_the_usage_outbox_keeps_records_until_they_are_acked(store: SessionStore) -> None:
    """A committed turn's usage record is written with it (and a stale commit writes none);
    a failed turn's is written alone; both stay until acked, whatever writes them twice."""
    record = _session()
    await store.create_session(record)
    sid, tag = record.session_id, uuid.uuid4().hex
    held = Reservation("res_" + tag, "alice", "2030-01-15", 50)
    usage = {"input_tokens": 3, "output_tokens": 4}
    committed = UsageRecord(f"turn_{tag}:1", "alice", "agent-1", usage, 0.25, held)
    failed = UsageRecord(f"turn_{tag}x:3", "alice", "agent-1", usage, 0.5, None, turns=1)
    await store.commit_turn(_turn(sid, 1), 0, committed)
    with pytest.raises(StaleSessionError):
        await store.commit_turn(_turn(sid, 1), 0, replace(committed, id=f"stale_{tag}:1"))
    await store.record_usage(failed)
    await store.record_usage(failed)  # a failed commit's turn, metered again: one record

    def mine(records: list[UsageRecord]) -> list[UsageRecord]:
        return [r for r in records if tag in r.id]

    assert mine(await store.unmetered_usage(time.time() + 1, 1_000)) == [committed, failed]
    assert mine(await store.unmetered_usage(time.time() - 3_600, 1_000)) == []
    await store.ack_usage([committed.id])
    await store.ack_usage([committed.id])
    assert mine(await store.unmetered_usage(time.time() + 1, 1_000)) == [failed]
    await store.ack_usage([failed.id])
    assert mine(await store.unmetered_usage(time.time() + 1, 1_000)) == []


async def test_ping(store: SessionStore) -> None:
    await store.ping()


async def test_sqlite_commits_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    first = SqliteSessionStore(path)
    record = _session()
    await first.create_session(record)
    await first.commit_turn(_turn(record.session_id, 1), expected_version=0)
    first.close()
    again = SqliteSessionStore(path)
    assert [t.index for t in await again.list_turns(record.session_id)] == [1]
    again.close()


async def test_a_sqlite_file_from_before_event_ids_were_reserved_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, "
        "owner TEXT NOT NULL, created_at REAL NOT NULL, version INTEGER NOT NULL DEFAULT 0, "
        "closed INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO sessions VALUES ('ses_old', 'agent-1', 'alice', 1.0, 0, 0);"
    )
    old.close()
    store = SqliteSessionStore(path)
    assert await store.reserve_seq("ses_old", 10) == 10
    record = await store.get_session("ses_old")
    assert record is not None and record.seq_reserved == 10
    store.close()
