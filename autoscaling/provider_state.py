"""What the provider must remember beyond Hypercore's List: tags Ray updated, and nodes it stopped.

Creation tags travel in each workload's env and come back through List, but Hypercore cannot
change a running workload's env, so tags Ray sets later (``set_node_tags``) live here, in a small
SQLite file next to the process that set them. Only ``ray up``'s head updater sets tags
(autoscaler v2 never calls ``set_node_tags``, and node updaters are disabled), so the file that
matters is on the machine that runs ``ray up``: ``ray get-head-ip``/``ray exec``/``ray down``
there find the head by its ``up-to-date`` status (``commands._get_running_head_node``).

Tombstones record the nodes this provider terminated, so a workload that Hypercore respawned from a
stale List entry (under a new workload id) is stopped on sight instead of coming back as a node.

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
# Hypercore respawns a stopped process within seconds; after this a tombstone has done its job.
TOMBSTONE_TTL_S = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS node_tags (
    cluster TEXT NOT NULL, node_id TEXT NOT NULL, tags TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (cluster, node_id));
CREATE TABLE IF NOT EXISTS tombstones (
    cluster TEXT NOT NULL, node_id TEXT NOT NULL, terminated_at REAL NOT NULL,
    PRIMARY KEY (cluster, node_id));
"""


class ProviderState:
    """Tag updates and tombstones of one cluster's nodes, in ``<state_dir>/provider.db``."""

    def __init__(self, state_dir: Path, cluster_name: str) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._path = state_dir / "provider.db"
        self._cluster = cluster_name
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S)
        try:
            with db:  # one transaction, committed on success
                yield db
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
        with self._connect() as db:
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
        older than ``TOMBSTONE_TTL_S``."""
        with self._connect() as db:
            db.execute(
                "DELETE FROM tombstones WHERE cluster = ? AND terminated_at < ?",
                (self._cluster, time.time() - TOMBSTONE_TTL_S),
            )
            db.execute(
                "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)",
                (self._cluster, node_id, time.time()),
            )
            db.execute(
                "DELETE FROM node_tags WHERE cluster = ? AND node_id = ?", (self._cluster, node_id)
            )

    def buried(self) -> set[str]:
        """Node ids terminated within the last ``TOMBSTONE_TTL_S``."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT node_id FROM tombstones WHERE cluster = ? AND terminated_at >= ?",
                (self._cluster, time.time() - TOMBSTONE_TTL_S),
            ).fetchall()
        return {r[0] for r in rows}
