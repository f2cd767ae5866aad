"""Agent pools in the control store: each agent's replicas and their states, the pool's last
scaling decision, and moving session routes between replicas.

The control store is the one place that knows every agent's replicas at once, so the limits that
span agents are applied here, in the transaction that allocates: the fleet's cap on replicas and
the owner's ``max_replicas`` and ``max_cores`` quotas. ``agents.replicas`` stays the count of the
agent's live rows (starting, ready, draining), which is what those quotas count.

A replica's index is never reused: a scaled-down replica's name (``agent-<id>-<n>``) is never
given to a new actor, so an ingress replica holding a cached handle or route to it gets a clean
"gone" and moves the session, instead of reaching a stranger. A route moves only off a replica
that is not ``ready`` (draining, or gone), to the least-loaded ready one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from .records import PoolAgent, PoolRow, ReplicaRow
from .sealing import redact_spec

POOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (
    agent_id TEXT NOT NULL, idx INTEGER NOT NULL, state TEXT NOT NULL,
    created_at REAL NOT NULL, changed_at REAL NOT NULL, deadline REAL,
    PRIMARY KEY (agent_id, idx));
CREATE TABLE IF NOT EXISTS pools (
    agent_id TEXT PRIMARY KEY, desired INTEGER NOT NULL, reason TEXT NOT NULL,
    state TEXT NOT NULL, next_index INTEGER NOT NULL, updated_at REAL NOT NULL);
"""
REPLICA_STATES = ("starting", "ready", "draining")
POOL_AGENTS_MAX = 10_000
# A session open claims its replica's slot until its route is recorded (``settle``); one that
# never records it (the open failed, the ingress died) gives the slot back after this long.
CLAIM_TTL_S = 30.0
CLAIMS_MAX = 10_000  # claims kept per agent; past it the oldest go first
LIVE_AGENT = ("starting", "ready", "pending")  # agent statuses whose pools scale


class PoolTable:
    """The pools' rows, on the control store's connection; every method runs inside the
    store's one-call-at-a-time actor, and those that write do so in one transaction."""

    def __init__(
        self, db: sqlite3.Connection, clock: Callable[[], float], room: Callable[[str, str], int]
    ) -> None:
        """``room(owner, spec_json)`` is how many more replicas of that spec the owner's quotas
        allow."""
        self._db = db
        self._clock = clock
        self._room = room
        # In memory, not in SQLite: a claim lives for one open, and a restarted store starts
        # from the routes alone (at worst one burst of opens leans on one replica again).
        self._claims: dict[str, list[tuple[int, float]]] = {}
        db.executescript(POOL_SCHEMA)
        self._adopt_fixed_agents()

    def _adopt_fixed_agents(self) -> None:
        """Agents stored before pools existed ran ``replicas`` replicas numbered from 0: they
        get those rows, as ready, once."""
        now = self._clock()
        rows = self._db.execute(
            "SELECT id, replicas FROM agents WHERE status != 'deleted' "
            "AND id NOT IN (SELECT agent_id FROM pools)"
        ).fetchall()
        for agent_id, count in rows:
            self.create(agent_id, int(count), "ready", now)

    def create(self, agent_id: str, count: int, state: str, now: float) -> None:
        """A new agent's pool: replicas 0..count-1 in ``state``. Call inside the transaction
        that stores the agent."""
        self._db.executemany(
            "INSERT OR IGNORE INTO replicas VALUES (?, ?, ?, ?, ?, NULL)",
            [(agent_id, i, state, now, now) for i in range(count)],
        )
        self._db.execute(
            "INSERT OR IGNORE INTO pools VALUES (?, ?, 'created', '{}', ?, ?)",
            (agent_id, count, count, now),
        )

    def replicas(self, agent_id: str) -> list[ReplicaRow]:
        rows = self._db.execute(
            "SELECT agent_id, idx, state, created_at, changed_at, deadline FROM replicas "
            "WHERE agent_id = ? ORDER BY idx",
            (agent_id,),
        ).fetchall()
        return [ReplicaRow(*row) for row in rows]

    def pool(self, agent_id: str) -> PoolRow | None:
        row = self._db.execute(
            "SELECT agent_id, desired, reason, state, updated_at FROM pools WHERE agent_id = ?",
            (agent_id,),
        ).fetchone()
        return None if row is None else PoolRow(*row)

    def agent(self, agent_id: str) -> PoolAgent | None:
        """One agent as ``agents`` lists it (None: not scaled, or unknown)."""
        return next((a for a in self._agents(agent_id) if a.spec), None)

    def agents(self) -> list[PoolAgent]:
        """Every agent the controller scales (not being deleted), and every deleted agent that
        still has replica rows (whose replicas the controller stops)."""
        return self._agents(None)

    def _agents(self, agent_id: str | None) -> list[PoolAgent]:
        rows = self._db.execute(
            "SELECT id, owner, spec, status FROM agents "
            "WHERE (status IN ('starting', 'ready', 'pending') "
            "OR (status = 'deleted' AND id IN (SELECT agent_id FROM replicas))) "
            "AND (? IS NULL OR id = ?) ORDER BY created_at LIMIT ?",
            (agent_id, agent_id, POOL_AGENTS_MAX),
        ).fetchall()
        out = []
        for agent_id, owner, spec, status in rows:
            # Redacted: a tick reads every agent; the key is opened only to start a replica
            # (``ControlStore.replica_spec``), never sent around on every tick.
            shown = "" if status == "deleted" else redact_spec(spec)
            replicas = tuple(self.replicas(agent_id))
            out.append(PoolAgent(agent_id, owner, shown, replicas, self.pool(agent_id)))
        return out

    def fleet_size(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM replicas").fetchone()
        return int(count)

    def allocate(self, agent_id: str, count: int, fleet_max: int) -> list[int]:
        """Adds up to ``count`` replica rows (``starting``) with fresh indices to a live agent,
        as many as ``fleet_max`` (replicas of every agent) and its owner's quotas allow, in one
        transaction; returns their indices (none for a deleted or unknown agent)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT a.owner, a.spec, a.status, p.next_index FROM agents a "
                "JOIN pools p ON p.agent_id = a.id WHERE a.id = ?",
                (agent_id,),
            ).fetchone()
            if row is None or row[2] not in LIVE_AGENT:
                db.execute("ROLLBACK")
                return []
            owner, spec_json, _, next_index = row
            allowed = min(count, fleet_max - self.fleet_size(), self._room(owner, spec_json))
            indices = list(range(int(next_index), int(next_index) + max(0, allowed)))
            now = self._clock()
            db.executemany(
                "INSERT INTO replicas VALUES (?, ?, 'starting', ?, ?, NULL)",
                [(agent_id, i, now, now) for i in indices],
            )
            db.execute(
                "UPDATE pools SET next_index = ? WHERE agent_id = ?",
                (int(next_index) + len(indices), agent_id),
            )
            self._count(agent_id)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return indices

    def set_state(self, agent_id: str, index: int, state: str, deadline: float | None) -> bool:
        """Moves a replica to ``state``; False when it has no row (removed), or, for
        ``ready``, when its agent is no longer live (being deleted: the replica must stop)."""
        if state not in REPLICA_STATES:
            raise ValueError(f"unknown replica state {state!r}")
        cursor = self._db.execute(
            "UPDATE replicas SET state = ?, changed_at = ?, deadline = ? "
            "WHERE agent_id = ? AND idx = ? AND (? != 'ready' OR EXISTS (SELECT 1 FROM agents "
            "WHERE id = ? AND status IN ('starting', 'ready', 'pending')))",
            (state, self._clock(), deadline, agent_id, index, state, agent_id),
        )
        return cursor.rowcount > 0

    def remove(self, agent_id: str, index: int, only_state: str | None = None) -> bool:
        """Deletes a replica's row (only while it is in ``only_state``, when given); True when
        one went."""
        cursor = self._db.execute(
            "DELETE FROM replicas WHERE agent_id = ? AND idx = ? AND (? IS NULL OR state = ?)",
            (agent_id, index, only_state, only_state),
        )
        self._count(agent_id)
        return cursor.rowcount > 0

    def drop(self, agent_id: str) -> None:
        """A deleted agent's pool: its rows go (its replicas were stopped)."""
        self._claims.pop(agent_id, None)
        self._db.execute("DELETE FROM replicas WHERE agent_id = ?", (agent_id,))
        self._count(agent_id)

    def _count(self, agent_id: str) -> None:
        self._db.execute(
            "UPDATE agents SET replicas = (SELECT COUNT(*) FROM replicas WHERE agent_id = ?) "
            "WHERE id = ?",
            (agent_id, agent_id),
        )

    def record(self, agent_id: str, desired: int, reason: str, state_json: str) -> None:
        self._db.execute(
            "UPDATE pools SET desired = ?, reason = ?, state = ?, updated_at = ? "
            "WHERE agent_id = ?",
            (desired, reason, state_json, self._clock(), agent_id),
        )

    # Placement and moves --------------------------------------------------------------------

    def placement(self, agent_id: str, claim: bool = False) -> list[tuple[int, int]]:
        """The agent's ready replicas with their open sessions (and the slots claimed by opens
        in flight), least loaded first. ``claim`` claims a slot on the first: concurrent opens
        each see the others' claims, so a burst spreads over the replicas instead of every
        open reading the same counts and landing on the same one."""
        rows = self._db.execute(
            "SELECT p.idx, COALESCE(r.n, 0) AS n FROM replicas p LEFT JOIN ("
            "SELECT replica, COUNT(*) AS n FROM routes WHERE agent_id = ? AND closed = 0 "
            "GROUP BY replica) r ON r.replica = p.idx "
            "WHERE p.agent_id = ? AND p.state = 'ready'",
            (agent_id, agent_id),
        ).fetchall()
        claimed: dict[int, int] = {}
        for index, _ in self._live_claims(agent_id):
            claimed[index] = claimed.get(index, 0) + 1
        load = sorted(
            ((int(i), int(n) + claimed.get(int(i), 0)) for i, n in rows),
            key=lambda row: (row[1], row[0]),
        )
        if claim and load:
            claims = self._claims.setdefault(agent_id, [])
            claims.append((load[0][0], self._clock()))
            del claims[:-CLAIMS_MAX]
        return load

    def settle(self, agent_id: str, index: int) -> None:
        """An open recorded its route on replica ``index``, or the replica it claimed refused
        it: a claim on ``index`` ends (claims are counts, so the oldest goes). An open that
        landed on a replica it did not claim has no claim there, and ends none."""
        claims = self._claims.get(agent_id)
        if not claims:
            return
        for n, (claimed, _) in enumerate(claims):
            if claimed == index:
                del claims[n]
                break
        if not claims:
            del self._claims[agent_id]

    def _live_claims(self, agent_id: str) -> list[tuple[int, float]]:
        claims = self._claims.get(agent_id)
        if not claims:
            return []
        horizon = self._clock() - CLAIM_TTL_S
        live = [c for c in claims if c[1] > horizon]
        if live:
            self._claims[agent_id] = live
        else:
            del self._claims[agent_id]
        return live

    def move_off(self, agent_id: str, source: int, session_ids: list[str] | None) -> int:
        """Moves open routes off replica ``source`` (``session_ids``, or all of them) to the
        agent's ready replicas, each to the least loaded at that moment, if ``source`` is not
        ready (draining, or without a row); returns how many moved (none when no replica is
        ready to take them)."""
        state = self._db.execute(
            "SELECT state FROM replicas WHERE agent_id = ? AND idx = ?", (agent_id, source)
        ).fetchone()
        if state is not None and state[0] == "ready":
            return 0
        if session_ids is None:
            rows = self._db.execute(
                "SELECT session_id FROM routes WHERE agent_id = ? AND replica = ? AND closed = 0",
                (agent_id, source),
            ).fetchall()
            session_ids = [session_id for (session_id,) in rows]
        load = {i: n for i, n in self.placement(agent_id) if i != source}
        if not load or not session_ids:
            return 0
        moves = []
        for session_id in session_ids:
            target = min(load, key=lambda i: (load[i], i))
            load[target] += 1
            moves.append((target, session_id, source))
        self._db.executemany(
            "UPDATE routes SET replica = ? WHERE session_id = ? AND replica = ? AND closed = 0",
            moves,
        )
        return len(moves)
