"""What the roles exchange about a turn's tokens: its reservation and, once it committed, its usage.

A turn's tokens travel one way: the ingress's admission (``serve_app.admission``, either gate)
takes a ``Reservation`` of the agent's ``max_tokens`` against the user's ``tokens_per_day``; the
turn carries it to its replica (``actors``), whose meter sends it back with the committed turn's
usage in a ``UsageRecord``; the control store records the usage and ends the reservation in the
same step, so a turn counts as reserved or as used, never as neither. A turn that commits nothing
new has its reservation released by the ingress instead.

The types live here, not in ``serve_app``, so that a replica names them without loading the API.
Both cross Ray's process boundary and pickle as themselves (plain frozen dataclasses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

# Longer than any turn may run (an agent's ``turn_timeout_s`` is at most an hour): a reservation
# that nobody ends (its ingress replica died, a release was lost) stops counting after this.
RESERVATION_TTL_S = 3_900.0


def utc_day(at_s: float) -> str:
    """The day a budget counts in: the UTC date of ``at_s`` (seconds since the epoch)."""
    return datetime.fromtimestamp(at_s, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Reservation:
    """``tokens`` of ``user_id``'s budget for ``day``, held by one turn until the turn is metered,
    the ingress releases it, or ``RESERVATION_TTL_S`` passes.

    ``id`` is unique. Where a reservation is held (the control store's SQLite, or Redis) is the
    admission gate's business; ending one is idempotent in either place, so the control store
    ends a metered turn's reservation in both without asking which.
    """

    id: str
    user_id: str
    day: str
    tokens: int


@dataclass(frozen=True)
class UsageRecord:
    """A committed turn's usage, as a replica meters it (``actors.meter``). ``turn_id`` makes a
    record sent twice count once; ``reservation`` is the one the API admitted the turn with, or
    None (a batch job's turn, or a user without a daily budget)."""

    turn_id: str
    user_id: str
    agent_id: str
    usage: Mapping[str, int]
    cost_usd: float
    reservation: Reservation | None = None
