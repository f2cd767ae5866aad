"""One-time join tickets: how a worker node gets the Ray auth token without a secret in its env.

Hypercore's List echoes every workload's env to anyone who can reach it, so the provider puts a
ticket there instead of the token. The ticket is bound to one instance id and is worth the token
once: the head's join service (``cluster.join.service``) redeems it and answers with the token.

Rules (``TicketBook.redeem``):
- unknown ticket: refused; the book keeps only a SHA-256 of each ticket, so the file is no
  token oracle, and lookups go by that hash;
- after ``revoke(instance_id)`` (the provider terminated the instance): refused for good;
- the TTL bounds the FIRST redemption only: a ticket never redeemed is refused for good once it
  expires, but a redeemed one stays good for rejoins until revoked (Hypercore may respawn the
  workload from the same env at any time in its life);
- a ticket already redeemed may be redeemed again only when the GCS lists a DEAD Ray node with
  its instance id and no ALIVE one (``InstanceState``): proof that the first redeemer joined and
  then died, i.e. the workload was respawned. Not within ``rejoin_holdoff_s`` of the last
  redemption either: the holdoff covers the seconds between a redemption and the node
  registering with the GCS. Every refusal here is retryable (a respawned node waits for the GCS
  to declare its predecessor dead), and every re-redemption is logged as a warning.

Several processes share the book (the provider in the autoscaler mints and revokes, the join
service redeems), so it lives in SQLite with WAL and a busy timeout, and a redemption claims the
ticket with a compare-and-set on its redemption count: two concurrent redemptions of a fresh
ticket cannot both win.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hyperfleet.errors import HyperfleetError
from hyperfleet.private import private_database

logger = logging.getLogger("hyperfleet.join")

BUSY_TIMEOUT_MS = 5_000
TICKET_BYTES = 32
DEFAULT_REJOIN_HOLDOFF_S = 20.0
# Revoked tickets, and tickets that expired unredeemed, are kept this long (for the log trail),
# then pruned. A redeemed ticket that is not revoked is kept: its instance may still rejoin.
KEEP_EXPIRED_S = 24 * 3600.0
MAX_INSTANCE_ID_CHARS = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    ticket_sha256 TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    minted_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL,
    redemptions INTEGER NOT NULL DEFAULT 0,
    last_redeemed_at REAL
);
CREATE INDEX IF NOT EXISTS tickets_instance ON tickets(instance_id);
"""


class JoinError(HyperfleetError):
    """A ticket was not redeemed. Subclasses say why and whether trying again can help."""

    status_code = 401
    error_type = "join_refused"


class UnknownTicket(JoinError):
    status_code = 401
    error_type = "unknown_ticket"


class TicketRevoked(JoinError):
    status_code = 403
    error_type = "ticket_revoked"


class TicketExpired(JoinError):
    status_code = 410
    error_type = "ticket_expired"


class TicketInUse(JoinError):
    """Redeemed already, and its instance is alive, just joined, or never joined (no DEAD node
    proves a respawn); retry after ``retry_after_s``."""

    status_code = 409
    error_type = "ticket_in_use"
    retryable = True


class LivenessUnknown(JoinError):
    """The GCS could not say whether the instance is alive; retry later."""

    status_code = 503
    error_type = "liveness_unknown"
    retryable = True


class InstanceState(enum.Enum):
    """What the GCS node table says about the Ray nodes of one instance id."""

    ALIVE = "alive"  # some node with the id is ALIVE
    DEAD = "dead"  # nodes with the id are listed, all DEAD: it joined once, then died
    ABSENT = "absent"  # no node with the id is listed


@dataclass(frozen=True)
class Ticket:
    """What the book holds for one ticket (never the ticket itself)."""

    instance_id: str
    minted_at: float
    expires_at: float
    revoked_at: float | None
    redemptions: int
    last_redeemed_at: float | None


def ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


class TicketBook:
    """Join tickets in one SQLite file, shared by processes; thread-safe within one.

    Args:
        db_path: the SQLite file (created with its directory on first use).
        rejoin_holdoff_s: how long after a redemption the ticket is refused even when its
            instance is not (yet) alive in the GCS.
        clock: seconds since the epoch; injected by tests.
    """

    def __init__(
        self,
        db_path: Path,
        *,
        rejoin_holdoff_s: float = DEFAULT_REJOIN_HOLDOFF_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # 0600 before SQLite opens it, so its -wal and -shm are too: the file holds hashes only,
        # but a reader could still learn instance ids.
        private_database(db_path)
        self.db_path = db_path
        self._rejoin_holdoff_s = rejoin_holdoff_s
        self._clock = clock
        self._lock = threading.Lock()
        # Autocommit: each statement is its own transaction, which the compare-and-set needs.
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def mint(self, instance_id: str, ttl_s: float) -> str:
        """A new ticket for ``instance_id``, valid for ``ttl_s`` seconds. Only its hash is kept."""
        if not instance_id or len(instance_id) > MAX_INSTANCE_ID_CHARS:
            raise ValueError(f"instance_id must be 1..{MAX_INSTANCE_ID_CHARS} characters")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        now = self._clock()
        with self._lock:
            cutoff = now - KEEP_EXPIRED_S
            self._db.execute(
                "DELETE FROM tickets WHERE (revoked_at IS NOT NULL AND revoked_at < ?)"
                " OR (redemptions = 0 AND expires_at < ?)",
                (cutoff, cutoff),
            )
            self._db.execute(
                "INSERT INTO tickets (ticket_sha256, instance_id, minted_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (ticket_hash(ticket), instance_id, now, now + ttl_s),
            )
        return ticket

    def revoke(self, instance_id: str) -> int:
        """Refuses every ticket of ``instance_id`` from now on; idempotent. Returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE tickets SET revoked_at = ? WHERE instance_id = ? AND revoked_at IS NULL",
                (self._clock(), instance_id),
            )
        return cursor.rowcount

    def lookup(self, ticket: str) -> Ticket | None:
        """What the book holds for ``ticket``, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT instance_id, minted_at, expires_at, revoked_at, redemptions,"
                " last_redeemed_at FROM tickets WHERE ticket_sha256 = ?",
                (ticket_hash(ticket),),
            ).fetchone()
        return None if row is None else Ticket(*row)

    def redeem(self, ticket: str, liveness: Callable[[str], InstanceState]) -> str:
        """Spends ``ticket`` and returns its instance id, or raises why not (``JoinError``).

        Args:
            ticket: the ticket as minted.
            liveness: what the GCS says about the Ray nodes of an instance id
                (``cluster.join.service.GcsLiveness`` in production); consulted only for a ticket
                redeemed before. It may raise ``LivenessUnknown``.
        """
        record = self.lookup(ticket)
        now = self._clock()
        if record is None:
            raise UnknownTicket("unknown join ticket")
        if record.revoked_at is not None:
            raise TicketRevoked(f"the join ticket of instance {record.instance_id} was revoked")
        if record.redemptions == 0 and now >= record.expires_at:
            raise TicketExpired(f"the join ticket of instance {record.instance_id} expired")
        if record.redemptions > 0:
            assert record.last_redeemed_at is not None
            wait_s = record.last_redeemed_at + self._rejoin_holdoff_s - now
            if wait_s > 0:
                raise TicketInUse(
                    f"instance {record.instance_id} redeemed this ticket moments ago",
                    retry_after_s=round(wait_s, 1),
                )
            state = liveness(record.instance_id)
            if state is InstanceState.ALIVE:
                raise TicketInUse(
                    f"a Ray node of instance {record.instance_id} is alive",
                    retry_after_s=self._rejoin_holdoff_s,
                )
            if state is not InstanceState.DEAD:
                # Redeemed, yet no node of the instance ever registered: no proof of a respawn,
                # so whoever holds the ticket (anyone who read Hypercore's List) waits.
                raise TicketInUse(
                    f"instance {record.instance_id} redeemed this ticket but never joined",
                    retry_after_s=self._rejoin_holdoff_s,
                )
        with self._lock:
            # Compare-and-set on the count read above: of two concurrent redemptions one wins.
            cursor = self._db.execute(
                "UPDATE tickets SET redemptions = redemptions + 1, last_redeemed_at = ?"
                " WHERE ticket_sha256 = ? AND redemptions = ? AND revoked_at IS NULL",
                (now, ticket_hash(ticket), record.redemptions),
            )
        if cursor.rowcount != 1:
            if (again := self.lookup(ticket)) is not None and again.revoked_at is not None:
                raise TicketRevoked(f"the join ticket of instance {record.instance_id} was revoked")
            raise TicketInUse(
                f"instance {record.instance_id} redeemed this ticket concurrently",
                retry_after_s=self._rejoin_holdoff_s,
            )
        if record.redemptions > 0:
            logger.warning(
                "join ticket of instance %s redeemed again (redemption %d): its Ray node is DEAD,"
                " taken as a respawn",
                record.instance_id,
                record.redemptions + 1,
            )
        return record.instance_id
