"""The control-plane store: users, API keys, agents, session routes, usage and token reservations.

One SQLite file on the head, behind one actor (``ControlStoreActor``) that runs one call at a time,
so quota checks (agents per user, tokens per day) are atomic across ingress replicas.
Admission of a turn reserves its ``max_tokens`` against the day's budget; the replica charges each
further model call (metering the calls so far and re-taking the reservation for the next, or
refused) and meters the rest when the turn ends, and the reservation ends in the same transaction
(``hyperfleet.metering`` says how a turn's tokens travel).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from hyperfleet.metering import RESERVATION_TTL_S, Charge, Reservation, UsageRecord, utc_day
from hyperfleet.private import create_private, private_database

from . import keys
from .errors import QuotaExceededError
from .pools import PoolTable
from .ratelimit import NOT_LIMITED, MovingWindows, user_window
from .records import (
    Admission,
    Agent,
    IssuedKey,
    Route,
    UsageRow,
    User,
    over_budget,
)
from .sealing import KeySealer, redact_spec, seal_plaintext_keys
from .usage_sql import (
    ADD_USAGE,
    METERED_TURNS_KEPT_S,
    PRUNE_METERED_EVERY,
    TOKEN_FIELDS,
    UsageMirror,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, is_admin INTEGER NOT NULL,
    quotas TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    prefix TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id),
    secret_hash TEXT NOT NULL, created_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
    replicas INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS routes (
    session_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, owner TEXT NOT NULL,
    replica INTEGER NOT NULL, created_at REAL NOT NULL, closed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS routes_agent ON routes(agent_id, closed);
CREATE INDEX IF NOT EXISTS routes_owner ON routes(owner, closed);
CREATE TABLE IF NOT EXISTS usage (
    user_id TEXT NOT NULL, agent_id TEXT NOT NULL, day TEXT NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0, turns INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, agent_id, day));
CREATE TABLE IF NOT EXISTS metered_turns (turn_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS metered_turns_at ON metered_turns(at);
-- Reservations had integer ids (table ``reservations``) before they had one type for both gates
-- (text ids). The old table is left as it is: its holds expire within RESERVATION_TTL_S.
CREATE TABLE IF NOT EXISTS turn_reservations (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, day TEXT NOT NULL,
    tokens INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS turn_reservations_user ON turn_reservations(user_id, day);
"""
MAX_AGENTS_LISTED = 1_000
MAX_ROOM = 1_000_000  # replicas an owner without a user record (none: a test's) may add
DEFAULT_MAX_TOKENS = 4096  # an AgentSpec's default
DEFAULT_CORES = 1.0  # an AgentSpec's default


CORES_SLACK = 1e-9  # cores are fractions: 0.1 + 0.2 may be 0.30000000000000004


def _cores_of(spec_json: str) -> float:
    """An agent's cores per replica, from its stored spec (an AgentSpec's JSON)."""
    try:
        return float(json.loads(spec_json).get("resources", {}).get("cores", DEFAULT_CORES))
    except (ValueError, AttributeError, TypeError):
        return DEFAULT_CORES


def today() -> str:
    """The UTC day budgets count in now."""
    return utc_day(time.time())


class ControlStore:
    """The control plane's state. The server secret that keys are hashed with, and the key that
    seals tenants' own Anthropic keys (``sealing.py``), are created next to the database on first
    start (mode 0600, like the database and its -wal/-shm) and never leave this process.

    ``clock`` (seconds since the epoch) times the rate-limit windows, reservations and the day a
    budget counts in; tests pass a fake one."""

    def __init__(
        self,
        path: Path,
        used_mirror: UsageMirror | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        private_database(path)
        secret_path = path.with_suffix(".secret")
        create_private(secret_path, secrets.token_bytes(32))
        self._secret = secret_path.read_bytes()
        self._sealer = KeySealer(path.with_suffix(".sealing-key"))
        self._clock = clock
        self._windows = MovingWindows(clock)
        self._max_tokens: dict[str, int] = {}  # per agent; a spec never changes
        self._used_mirror = used_mirror
        self._metered_batches = 0
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA busy_timeout = 5000")
        # Deleted and overwritten content is zeroed, not left in free space: a key sealed in
        # place of its plaintext leaves no plaintext behind.
        self._db.execute("PRAGMA secure_delete = ON")
        self._db.executescript(_SCHEMA)
        seal_plaintext_keys(self._db, self._sealer)
        self.pools = PoolTable(self._db, clock, self._room)

    def close(self) -> None:
        self._db.close()

    # Users and keys -----------------------------------------------------------------------

    def create_user(
        self, user_id: str, name: str, quotas: Mapping[str, Any], is_admin: bool = False
    ) -> User:
        self._db.execute(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
            (user_id, name, int(is_admin), json.dumps(dict(quotas)), self._clock()),
        )
        user = self.get_user(user_id)
        assert user is not None  # inserted just now
        return user

    def get_user(self, user_id: str) -> User | None:
        row = self._db.execute(
            "SELECT id, name, is_admin, quotas, created_at FROM users WHERE id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        return User(row[0], row[1], bool(row[2]), json.loads(row[3]), row[4])

    def set_quotas(self, user_id: str, quotas: Mapping[str, Any]) -> User | None:
        self._db.execute(
            "UPDATE users SET quotas = ? WHERE id = ?", (json.dumps(dict(quotas)), user_id)
        )
        return self.get_user(user_id)

    def issue_key(self, user_id: str) -> IssuedKey:
        """A new key for the user: the plaintext is returned here, once, and never stored.

        Raises ``QuotaExceededError`` when the user has ``max_keys`` live (unrevoked) keys
        already (counted and inserted in one transaction); revoking a key frees its place. The
        limit keeps keys from multiplying a user's ``requests_per_minute``, which is counted per
        user, not per key, and bounds the keys a user can leave lying around."""
        key = keys.new_key(self._secret)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            user = self.get_user(user_id)
            (live,) = db.execute(
                "SELECT COUNT(*) FROM api_keys WHERE user_id = ? AND revoked = 0", (user_id,)
            ).fetchone()
            if user is not None and live >= user.max_keys:
                raise QuotaExceededError(
                    f"max_keys: you have {live} live API keys, your quota is {user.max_keys}; "
                    "revoke keys you no longer use"
                )
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, 0)",
                (key.prefix, user_id, key.secret_hash, self._clock()),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return IssuedKey(key.prefix, key.plaintext)

    def authenticate(self, api_key: str) -> User | None:
        """The user a key belongs to, or None for a malformed, unknown or revoked key."""
        parsed = keys.parse_key(api_key)
        if parsed is None:
            return None
        prefix, secret = parsed
        row = self._db.execute(
            "SELECT user_id, secret_hash FROM api_keys WHERE prefix = ? AND revoked = 0", (prefix,)
        ).fetchone()
        if row is None or not keys.verify(self._secret, secret, row[1]):
            return None
        user = self.get_user(row[0])
        return None if user is None else replace(user, key_prefix=prefix)

    def admit(self, api_key: str | None, client_ip: str, ip_per_minute: int | None) -> Admission:
        """One call per request: the per-IP limit (none for an exempt address: ``ip_per_minute``
        None), the key, then its user's limit (one window per user, whichever of the user's keys
        the request carries)."""
        by_ip = NOT_LIMITED
        if ip_per_minute is not None:
            by_ip = self._windows.hit("ip:" + client_ip, ip_per_minute)
            if not by_ip.allowed:
                return Admission(None, by_ip)
        user = self.authenticate(api_key) if api_key else None
        if user is None:
            return Admission(None, by_ip)
        return Admission(user, self._windows.hit(user_window(user.id), user.requests_per_minute))

    def revoke_key(self, prefix: str, requester: str | None) -> bool:
        """Revokes a key; ``requester`` None is an admin, else only the key's own user."""
        query = "UPDATE api_keys SET revoked = 1 WHERE prefix = ? AND revoked = 0"
        args: tuple[str, ...] = (prefix,)
        if requester is not None:
            query += " AND user_id = ?"
            args = (prefix, requester)
        return self._db.execute(query, args).rowcount == 1

    def has_admin(self) -> bool:
        return self._db.execute("SELECT 1 FROM users WHERE is_admin = 1").fetchone() is not None

    def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission:
        """The hot path of ``POST /messages`` in one call: limits and key (as ``admit``), the
        session's route and, for a user with a daily budget, the turn's token reservation: the
        agent's ``max_tokens`` and the message's estimated ``input_tokens`` (or why the budget
        refused it)."""
        admitted = self.admit(api_key, client_ip, ip_per_minute)
        user = admitted.user
        if user is None or not admitted.decision.allowed:
            return admitted
        route = self.get_route(session_id)
        if route is None or route.owner != user.id:
            return admitted
        budget = user.tokens_per_day
        if budget is None:
            return replace(admitted, route=route)
        try:
            reservation = self.reserve(user.id, route.max_tokens + input_tokens, budget)
        except QuotaExceededError as e:
            return replace(admitted, route=route, over_budget=e.message)
        return replace(admitted, route=route, reservation=reservation)

    # Agents -------------------------------------------------------------------------------

    def create_agent(
        self, agent_id: str, owner: str, spec_json: str, replicas: int, max_agents: int
    ) -> Agent:
        """Stores an agent; the Anthropic key in ``spec_json``, if any, is stored sealed."""
        now = self._clock()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM agents WHERE owner = ? AND status != 'deleted'", (owner,)
            ).fetchone()
            if count >= max_agents:
                raise QuotaExceededError(
                    f"max_agents: you have {count} agents, your quota is {max_agents}"
                )
            self._check_capacity(owner, replicas, replicas * _cores_of(spec_json))
            db.execute(
                "INSERT INTO agents VALUES (?, ?, ?, 'starting', ?, ?)",
                (agent_id, owner, self._sealer.seal_spec(spec_json, agent_id), replicas, now),
            )
            self.pools.create(agent_id, replicas, "starting", now)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        agent = self.get_agent(agent_id)
        assert agent is not None  # inserted just now
        return agent

    def _held(self, owner: str) -> tuple[int, float]:
        """The replicas and cores of the owner's agents (not deleted)."""
        rows = self._db.execute(
            "SELECT spec, replicas FROM agents WHERE owner = ? AND status != 'deleted'", (owner,)
        ).fetchall()
        return sum(int(n) for _, n in rows), sum(_cores_of(spec) * int(n) for spec, n in rows)

    def _check_capacity(self, owner: str, replicas: int, cores: float) -> None:
        """Raises ``QuotaExceededError`` unless ``replicas`` more replicas of ``cores`` cores in
        all fit in the owner's ``max_replicas`` and ``max_cores``, next to the agents they have
        (not deleted). Call inside the transaction that stores the agent; the quotas are read
        there, so a quota just lowered applies at once, whichever ingress replica is asked."""
        user = self.get_user(owner)
        if user is None:
            return
        used_replicas, used_cores = self._held(owner)
        if used_replicas + replicas > user.max_replicas:
            raise QuotaExceededError(
                f"max_replicas: your agents run {used_replicas} replicas and this one asks for "
                f"{replicas}; your quota is {user.max_replicas}"
            )
        if used_cores + cores > user.max_cores + CORES_SLACK:
            raise QuotaExceededError(
                f"max_cores: your replicas take {used_cores:g} cores and this agent asks for "
                f"{cores:g}; your quota is {user.max_cores:g}"
            )

    def get_agent(self, agent_id: str) -> Agent | None:
        row = self._db.execute(
            "SELECT id, owner, spec, status, replicas, created_at FROM agents WHERE id = ?",
            (agent_id,),
        ).fetchone()
        if row is None or row[3] == "deleted":
            return None
        return Agent(row[0], row[1], redact_spec(row[2]), *row[3:])

    def replica_spec(self, agent_id: str) -> str | None:
        """The agent's spec with its Anthropic key opened, for whoever starts its replicas (never
        for an HTTP answer); None for an unknown or deleted agent."""
        row = self._db.execute(
            "SELECT spec FROM agents WHERE id = ? AND status != 'deleted'", (agent_id,)
        ).fetchone()
        return None if row is None else self._sealer.open_spec(row[0], agent_id)

    def list_agents(self, owner: str | None) -> list[Agent]:
        query = "SELECT id FROM agents WHERE status != 'deleted'"
        args: tuple[str, ...] = ()
        if owner is not None:
            query += " AND owner = ?"
            args = (owner,)
        rows = self._db.execute(query + f" ORDER BY created_at LIMIT {MAX_AGENTS_LISTED}", args)
        return [a for (agent_id,) in rows.fetchall() if (a := self.get_agent(agent_id))]

    def set_agent_status(self, agent_id: str, status: str) -> None:
        self._db.execute("UPDATE agents SET status = ? WHERE id = ?", (status, agent_id))

    # Session routes -----------------------------------------------------------------------

    def add_route(self, session_id: str, agent_id: str, owner: str, replica: int) -> None:
        """Records an opened session's route, or raises ``QuotaExceededError`` when the owner has
        ``max_sessions`` open already (counted and inserted in one transaction)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            user = self.get_user(owner)
            (open_sessions,) = db.execute(
                "SELECT COUNT(*) FROM routes r JOIN agents a ON a.id = r.agent_id "
                "WHERE r.owner = ? AND r.closed = 0 AND a.status != 'deleted'",
                (owner,),
            ).fetchone()
            if user is not None and open_sessions >= user.max_sessions:
                raise QuotaExceededError(
                    f"max_sessions: you have {open_sessions} open sessions, your quota is "
                    f"{user.max_sessions}; close sessions you are done with"
                )
            db.execute(
                "INSERT INTO routes VALUES (?, ?, ?, ?, ?, 0)",
                (session_id, agent_id, owner, replica, self._clock()),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self.pools.settle(agent_id, replica)
        db.execute("COMMIT")

    def get_route(self, session_id: str) -> Route | None:
        """A session's route, or None when it is unknown, closed or its agent deleted."""
        row = self._db.execute(
            "SELECT r.session_id, r.agent_id, r.owner, r.replica, r.created_at, r.closed, "
            "a.status FROM routes r JOIN agents a ON a.id = r.agent_id WHERE r.session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None or row[5] or row[6] == "deleted":  # a deleted agent's sessions are gone
            return None
        route_id, agent_id, owner, replica, created_at = row[:5]
        max_tokens = self._agent_max_tokens(agent_id)
        return Route(route_id, agent_id, owner, replica, created_at, max_tokens)

    def _agent_max_tokens(self, agent_id: str) -> int:
        max_tokens = self._max_tokens.get(agent_id)
        if max_tokens is None:
            agent = self.get_agent(agent_id)
            spec = json.loads(agent.spec) if agent else {}
            max_tokens = int(spec.get("max_tokens", DEFAULT_MAX_TOKENS))
            self._max_tokens[agent_id] = max_tokens
        return max_tokens

    def close_route(self, session_id: str) -> None:
        self._db.execute("UPDATE routes SET closed = 1 WHERE session_id = ?", (session_id,))

    # Agent pools (``pools.py``: ``self.pools`` has the rest) -----------------------------

    def _room(self, owner: str, spec_json: str) -> int:
        """How many more replicas of ``spec_json`` the owner's quotas allow."""
        user = self.get_user(owner)
        if user is None:
            return MAX_ROOM
        used_replicas, used_cores = self._held(owner)
        room = user.max_replicas - used_replicas
        cores = _cores_of(spec_json)
        if cores > 0:
            room = min(room, int((user.max_cores - used_cores + CORES_SLACK) / cores))
        return room

    def rehome(self, session_id: str, source: int) -> Route | None:
        """Moves a session's route off replica ``source`` when that replica is draining or gone;
        returns the route as it is now (moved, or not: still on a ready replica, or no ready
        replica to move to), or None for an unknown or closed session."""
        route = self.get_route(session_id)
        if route is not None and route.replica == source:
            self.pools.move_off(route.agent_id, source, [session_id])
            route = self.get_route(session_id)
        return route

    # Usage and budgets --------------------------------------------------------------------

    def reserve(self, user_id: str, tokens: int, tokens_per_day: int) -> Reservation:
        """Holds ``tokens`` of the user's budget for a turn, or raises ``QuotaExceededError``."""
        now = self._clock()
        day = utc_day(now)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "DELETE FROM turn_reservations WHERE created_at <= ?", (now - RESERVATION_TTL_S,)
            )
            used = self._used(user_id, day)
            (reserved,) = db.execute(
                "SELECT COALESCE(SUM(tokens), 0) FROM turn_reservations "
                "WHERE user_id = ? AND day = ?",
                (user_id, day),
            ).fetchone()
            if used + reserved + tokens > tokens_per_day:
                raise QuotaExceededError(over_budget(tokens, used, reserved, tokens_per_day))
            reservation = Reservation(uuid.uuid4().hex, user_id, day, tokens)
            db.execute(
                "INSERT INTO turn_reservations VALUES (?, ?, ?, ?, ?)",
                (reservation.id, user_id, day, tokens, now),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return reservation

    def _used(self, user_id: str, day: str) -> int:
        (used,) = self._db.execute(
            "SELECT COALESCE(SUM(input_tokens + output_tokens + cache_read_input_tokens + "
            "cache_creation_input_tokens), 0) FROM usage WHERE user_id = ? AND day = ?",
            (user_id, day),
        ).fetchone()
        return int(used)

    def release(self, reservation: Reservation) -> None:
        """Ends a turn's reservation (its usage is recorded by the replica that committed it)."""
        self._db.execute("DELETE FROM turn_reservations WHERE id = ?", (reservation.id,))

    def record_usages(self, records: list[UsageRecord]) -> int:
        """Meters usage records in one transaction; returns how many were new.

        Called by replicas (in batches, ``actors/meter.py``), so a turn is metered whether its
        caller stayed (HTTP, stream or not) or went away, and batch jobs' turns are metered too.
        A record id metered before is skipped, so a batch sent again after a lost reply, or a
        record a sweep sends again, counts once. Each final record's reservation ends in the same
        transaction, so the day's budget never counts a turn as neither reserved nor used."""
        now = self._clock()
        day = utc_day(now)
        with self._transaction():
            metered, counted = self._meter(records, now, day)
        self._mirror(metered, day)
        return counted

    def charge(self, record: UsageRecord, reservation: Reservation, next_tokens: int) -> Charge:
        """Meters a turn's calls so far (``record``, as ``record_usages``) and re-takes the
        turn's reservation as ``next_tokens`` for its next model call, in one transaction:
        refused, and the reservation ended, when the day's used tokens, the user's other
        reservations and ``next_tokens`` exceed the user's ``tokens_per_day``."""
        now = self._clock()
        day = utc_day(now)
        user = self.get_user(reservation.user_id)
        budget = user.tokens_per_day if user is not None else None
        with self._transaction():
            metered, _ = self._meter([record], now, day)
            used = self._used(reservation.user_id, day)
            if reservation.held_in == "control" or self._used_mirror is None:
                self.release(reservation)
                (others,) = self._db.execute(
                    "SELECT COALESCE(SUM(tokens), 0) FROM turn_reservations "
                    "WHERE user_id = ? AND day = ? AND created_at > ?",
                    (reservation.user_id, day, now - RESERVATION_TTL_S),
                ).fetchone()
                if budget is not None and used + others + next_tokens > budget:
                    retaken = None
                else:  # under today's day: a turn that runs past midnight holds today's budget
                    retaken = replace(reservation, tokens=next_tokens, day=day)
                    self._db.execute(
                        "INSERT INTO turn_reservations VALUES (?, ?, ?, ?, ?)",
                        (retaken.id, retaken.user_id, retaken.day, next_tokens, now),
                    )
        if reservation.held_in == "redis" and self._used_mirror is not None:
            if budget is None:
                budget = 2**62  # no budget (removed since admission): the hold still moves
            retaken, others = self._used_mirror.retake(reservation, used, next_tokens, budget, now)
        else:
            self._mirror(metered, day)
        if retaken is None:
            return Charge(None, over_budget(next_tokens, used, int(others), budget or 0))
        return Charge(retaken)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT leaves it open
                self._db.execute("ROLLBACK")
            raise

    def _meter(
        self, records: list[UsageRecord], now: float, day: str
    ) -> tuple[dict[str, list[Reservation]], int]:
        """Adds new records' usage (in the caller's transaction): the reservations they end, by
        user, and how many records were new."""
        db = self._db
        metered: dict[str, list[Reservation]] = {}
        counted = 0
        for record in records:
            if (
                record.id
                and not db.execute(
                    "INSERT OR IGNORE INTO metered_turns VALUES (?, ?)", (record.id, now)
                ).rowcount
            ):
                continue
            held = metered.setdefault(record.user_id, [])
            if record.tokens or record.turns:
                values = [int(record.usage.get(f, 0)) for f in TOKEN_FIELDS]
                db.execute(
                    ADD_USAGE,
                    (
                        record.user_id,
                        record.agent_id,
                        day,
                        *values,
                        float(record.cost_usd),
                        int(record.turns),
                    ),
                )
            if record.reservation is not None:
                self.release(record.reservation)
                held.append(record.reservation)
            counted += 1
        self._metered_batches += 1
        if self._metered_batches % PRUNE_METERED_EVERY == 0:
            db.execute("DELETE FROM metered_turns WHERE at < ?", (now - METERED_TURNS_KEPT_S,))
        return metered, counted

    def _mirror(self, metered: dict[str, list[Reservation]], day: str) -> None:
        if self._used_mirror is not None:
            for user_id, reservations in metered.items():
                self._used_mirror(user_id, day, self._used(user_id, day), reservations)

    def usage(self, user_id: str) -> list[UsageRow]:
        rows = self._db.execute(
            "SELECT agent_id, day, input_tokens, output_tokens, cache_read_input_tokens, "
            "cache_creation_input_tokens, cost_usd, turns FROM usage WHERE user_id = ? "
            "ORDER BY day DESC, agent_id LIMIT 1000",
            (user_id,),
        ).fetchall()
        return [UsageRow(*row) for row in rows]
