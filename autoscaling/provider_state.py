"""What the provider must remember beyond Hypercore's List: tags Ray updated, and nodes it stopped.

Creation tags travel in each workload's env and come back through List, but Hypercore cannot
change a running workload's env, so tags Ray sets later (``set_node_tags``) live here, in a small
SQLite file next to the process that set them. Only ``ray up``'s head updater sets tags
(autoscaler v2 never calls ``set_node_tags``, and node updaters are disabled), so the file that
matters is on the machine that runs ``ray up``: ``ray get-head-ip``/``ray exec``/``ray down``
there find the head by its ``up-to-date`` status (``commands._get_running_head_node``).

Tombstones record the nodes this provider terminated, so a workload that Hypercore respawned from a
stale List entry (under a new workload id) is stopped on sight instead of coming back as a node. A
tombstone is kept until List has not shown the node for ``TOMBSTONE_UNSEEN_REFRESHES`` refreshes
spanning at least ``TOMBSTONE_UNSEEN_S`` (a respawn shows only after Hypercore's next refresh), and
at most ``TOMBSTONE_MAX_AGE_S``.

SQLite rather than memory: the autoscaler builds more than one provider instance, and a fresh
instance (a new ``ray`` command) must see the same state. Every call opens its own connection, so
the store is safe to share between threads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Another process may hold the write lock briefly; wait rather than fail.
BUSY_TIMEOUT_S = 10.0
WAL_RETRY_S = 0.01
# A tombstone is dropped once List has not shown its node for this many of the provider's refreshes
# and for this long (many of Hypercore's ~5 s refreshes), and in any case after the hard bound.
TOMBSTONE_UNSEEN_REFRESHES = 3
TOMBSTONE_UNSEEN_S = 120.0
TOMBSTONE_MAX_AGE_S = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS node_tags (
    cluster TEXT NOT NULL, node_id TEXT NOT NULL, tags TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (cluster, node_id));
CREATE TABLE IF NOT EXISTS tombstones (
    cluster TEXT NOT NULL, node_id TEXT NOT NULL, terminated_at REAL NOT NULL,
    PRIMARY KEY (cluster, node_id));
"""
# Added after the first release: a state_dir written by it lacks them.
_TOMBSTONE_COLUMNS = {
    "last_seen_at": "REAL NOT NULL DEFAULT 0",
    "unseen_refreshes": "INTEGER NOT NULL DEFAULT 0",
}


class ProviderState:
    """Tag updates and tombstones of one cluster's nodes, in ``<state_dir>/provider.db``."""

    def __init__(self, state_dir: Path, cluster_name: str) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._path = state_dir / "provider.db"
        self._cluster = cluster_name
        self._enable_wal()
        # In one write transaction: several providers may open the same new file at once.
        with self._write() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            have = {row[1] for row in db.execute("PRAGMA table_info(tombstones)")}
            for column, declaration in _TOMBSTONE_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE tombstones ADD COLUMN {column} {declaration}")

    def _enable_wal(self) -> None:
        """WAL, once set, stays with the file. Setting it needs the file to itself, and SQLite
        answers a concurrent switch with "database is locked" at once, without waiting out its
        busy timeout (seen when providers on several threads open a new file): so wait here."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                with self._connect() as db:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(WAL_RETRY_S)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S)
        try:
            with db:  # one transaction, committed on success
                yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE): a read-modify-write inside it
        cannot interleave with another process's."""
        db = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def tag_updates(self) -> dict[str, dict[str, str]]:
        """Tags set through ``set_node_tags``, per node id."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT node_id, tags FROM node_tags WHERE cluster = ?", (self._cluster,)
            ).fetchall()
        return {node_id: json.loads(tags) for node_id, tags in rows}

    def update_tags(self, node_id: str, tags: dict[str, str]) -> None:
        """Merges ``tags`` into the node's stored updates."""
        with self._write() as db:
            row = db.execute(
                "SELECT tags FROM node_tags WHERE cluster = ? AND node_id = ?",
                (self._cluster, node_id),
            ).fetchone()
            merged = {**(json.loads(row[0]) if row else {}), **tags}
            db.execute(
                "INSERT OR REPLACE INTO node_tags VALUES (?, ?, ?, ?)",
                (self._cluster, node_id, json.dumps(merged, sort_keys=True), time.time()),
            )

    def forget_tags(self, keep: Iterable[str], older_than_s: float) -> None:
        """Drops tag updates of nodes not in ``keep`` last written more than ``older_than_s`` ago
        (a node created a moment ago may not be in Hypercore's cached List yet)."""
        keep_set = set(keep)
        cutoff = time.time() - older_than_s
        with self._connect() as db:
            rows = db.execute(
                "SELECT node_id FROM node_tags WHERE cluster = ? AND updated_at < ?",
                (self._cluster, cutoff),
            ).fetchall()
            gone = [(self._cluster, r[0]) for r in rows if r[0] not in keep_set]
            db.executemany("DELETE FROM node_tags WHERE cluster = ? AND node_id = ?", gone)

    def bury(self, node_id: str) -> None:
        """Records that ``node_id`` was terminated, drops its tag updates, and purges tombstones
        older than ``TOMBSTONE_MAX_AGE_S``."""
        now = time.time()
        with self._write() as db:
            db.execute(
                "DELETE FROM tombstones WHERE cluster = ? AND terminated_at < ?",
                (self._cluster, now - TOMBSTONE_MAX_AGE_S),
            )
            db.execute(
                "INSERT OR REPLACE INTO tombstones"
                " (cluster, node_id, terminated_at, last_seen_at, unseen_refreshes)"
                " VALUES (?, ?, ?, ?, 0)",
                (self._cluster, node_id, now, now),
            )
            db.execute(
                "DELETE FROM node_tags WHERE cluster = ? AND node_id = ?", (self._cluster, node_id)
            )

    def buried(self) -> set[str]:
        """Node ids terminated and not yet released by ``note_listed``."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT node_id FROM tombstones WHERE cluster = ? AND terminated_at >= ?",
                (self._cluster, time.time() - TOMBSTONE_MAX_AGE_S),
            ).fetchall()
        return {r[0] for r in rows}

    def note_listed(self, listed: Iterable[str]) -> None:
        """Counts one refresh of List that showed the node ids ``listed``: a tombstone whose
        node List has not shown for ``TOMBSTONE_UNSEEN_REFRESHES`` refreshes and
        ``TOMBSTONE_UNSEEN_S`` is dropped (its workloads are gone), as is any past
        ``TOMBSTONE_MAX_AGE_S``."""
        listed_set = set(listed)
        now = time.time()
        with self._write() as db:
            rows = db.execute(
                "SELECT node_id, terminated_at, last_seen_at, unseen_refreshes FROM tombstones"
                " WHERE cluster = ?",
                (self._cluster,),
            ).fetchall()
            for node_id, terminated_at, last_seen_at, unseen in rows:
                seen_at = max(last_seen_at, terminated_at)
                key = (self._cluster, node_id)
                if node_id in listed_set:
                    db.execute(
                        "UPDATE tombstones SET last_seen_at = ?, unseen_refreshes = 0"
                        " WHERE cluster = ? AND node_id = ?",
                        (now, *key),
                    )
                elif now - terminated_at > TOMBSTONE_MAX_AGE_S or (
                    unseen + 1 >= TOMBSTONE_UNSEEN_REFRESHES and now - seen_at > TOMBSTONE_UNSEEN_S
                ):
                    db.execute("DELETE FROM tombstones WHERE cluster = ? AND node_id = ?", key)
                else:
                    db.execute(
                        "UPDATE tombstones SET unseen_refreshes = ?"
                        " WHERE cluster = ? AND node_id = ?",
                        (unseen + 1, *key),
                    )
