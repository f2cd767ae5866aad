"""SQLite session store: the default, one file on the head node.

WAL journal with ``synchronous=FULL``: a commit is on disk when ``commit_turn`` returns. Calls are
synchronous and short; the store runs inside one actor (``actor.py``) whose event loop serialises
them, so one connection suffices and ``BEGIN IMMEDIATE`` makes each commit atomic.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from hyperfleet.errors import (
    ConflictError,
    IdempotencyConflictError,
    NotFoundError,
    StaleSessionError,
    StoreError,
)
from hyperfleet.metering import UsageRecord, usage_to_json
from hyperfleet.private import private_database

from .base import SessionRecord, TurnRecord, readable_usage

BUSY_TIMEOUT_MS = 5_000
MAX_LIST = 1_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    closed INTEGER NOT NULL DEFAULT 0,
    seq_reserved INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    idx INTEGER NOT NULL,
    idempotency_key TEXT,
    body TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)
);
CREATE UNIQUE INDEX IF NOT EXISTS turns_key ON turns(session_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS usage_outbox (
    id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_outbox_at ON usage_outbox(at);
"""


_PUT_USAGE = "INSERT OR REPLACE INTO usage_outbox VALUES (?, ?, ?)"


class SqliteSessionStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        # Transcripts are tenants' data: the file and its -wal/-shm are 0600, a new folder 0700.
        private_database(path)
        self.path = path
        self._clock = clock  # when an outbox record was written
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        if "seq_reserved" not in columns:  # a file written before event ids were reserved
            self._db.execute(
                "ALTER TABLE sessions ADD COLUMN seq_reserved INTEGER NOT NULL DEFAULT 0"
            )

    def close(self) -> None:
        self._db.close()

    async def create_session(self, record: SessionRecord) -> None:
        try:
            self._db.execute(
                "INSERT INTO sessions (session_id, agent_id, owner, created_at, version, closed, "
                "seq_reserved) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.session_id,
                    record.agent_id,
                    record.owner,
                    record.created_at,
                    record.version,
                    int(record.closed),
                    record.seq_reserved,
                ),
            )
        except sqlite3.IntegrityError as e:
            raise ConflictError(f"session {record.session_id} exists") from e
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._db.execute(
            "SELECT session_id, agent_id, owner, created_at, version, closed, seq_reserved "
            "FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            return None
        return SessionRecord(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6])

    async def reserve_seq(self, session_id: str, count: int) -> int:
        try:
            row = self._db.execute(
                "UPDATE sessions SET seq_reserved = seq_reserved + ? "
                "WHERE session_id = ? AND closed = 0 RETURNING seq_reserved",
                (count, session_id),
            ).fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e
        if row is None:
            raise NotFoundError(f"session {session_id} is closed or unknown")
        return int(row[0])

    async def commit_turn(
        self, turn: TurnRecord, expected_version: int, usage: UsageRecord | None = None
    ) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT version, closed FROM sessions WHERE session_id = ?", (turn.session_id,)
                ).fetchone()
                if row is None or row[1]:
                    raise NotFoundError(f"session {turn.session_id} is closed or unknown")
                if row[0] != expected_version or turn.index != expected_version + 1:
                    raise StaleSessionError(
                        f"session {turn.session_id} is at version {row[0]}, not {expected_version}",
                        session_id=turn.session_id,
                    )
                if (
                    turn.idempotency_key is not None
                    and db.execute(
                        "SELECT 1 FROM turns WHERE session_id = ? AND idempotency_key = ?",
                        (turn.session_id, turn.idempotency_key),
                    ).fetchone()
                ):
                    raise IdempotencyConflictError(
                        f"idempotency key {turn.idempotency_key!r} was already used"
                    )
                db.execute(
                    "INSERT INTO turns VALUES (?, ?, ?, ?)",
                    (turn.session_id, turn.index, turn.idempotency_key, turn.to_json()),
                )
                db.execute(
                    "UPDATE sessions SET version = ? WHERE session_id = ?",
                    (turn.index, turn.session_id),
                )
                if usage is not None:
                    db.execute(_PUT_USAGE, (usage.id, self._clock(), usage_to_json(usage)))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e

    async def find_turn(self, session_id: str, idempotency_key: str) -> TurnRecord | None:
        row = self._db.execute(
            "SELECT body FROM turns WHERE session_id = ? AND idempotency_key = ?",
            (session_id, idempotency_key),
        ).fetchone()
        return None if row is None else TurnRecord.from_json(row[0])

    async def get_turn(self, session_id: str, turn_id: str) -> TurnRecord | None:
        # No index on the id: a session's turns are found by their session's key first.
        row = self._db.execute(
            "SELECT body FROM turns WHERE session_id = ? AND json_extract(body, '$.turn_id') = ?",
            (session_id, turn_id),
        ).fetchone()
        return None if row is None else TurnRecord.from_json(row[0])

    async def list_turns(
        self, session_id: str, after: int = 0, limit: int | None = None
    ) -> list[TurnRecord]:
        rows = self._db.execute(
            "SELECT body FROM turns WHERE session_id = ? AND idx > ? ORDER BY idx LIMIT ?",
            (session_id, after, min(limit or MAX_LIST, MAX_LIST)),
        ).fetchall()
        return [TurnRecord.from_json(r[0]) for r in rows]

    async def record_usage(self, record: UsageRecord) -> None:
        try:
            self._db.execute(_PUT_USAGE, (record.id, self._clock(), usage_to_json(record)))
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e

    async def unmetered_usage(self, before: float, limit: int) -> list[UsageRecord]:
        try:
            rows = self._db.execute(
                "SELECT body FROM usage_outbox WHERE at < ? ORDER BY at LIMIT ?",
                (before, min(limit, MAX_LIST)),
            ).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e
        return readable_usage(r[0] for r in rows)

    async def ack_usage(self, ids: list[str]) -> None:
        try:
            self._db.executemany("DELETE FROM usage_outbox WHERE id = ?", [(i,) for i in ids])
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e

    async def close_session(self, session_id: str) -> None:
        self._db.execute("UPDATE sessions SET closed = 1 WHERE session_id = ?", (session_id,))

    async def ping(self) -> None:
        self._db.execute("SELECT 1").fetchone()
