"""What the roles exchange about a turn's tokens: its reservation, and the usage of its model calls.

A turn's tokens travel one way. The ingress's admission (``serve_app.admission``, either gate)
takes a ``Reservation`` of the agent's ``max_tokens`` and the message's estimated size
(``estimate_tokens``) against the user's ``tokens_per_day`` and
hands it to the turn's replica (``actors``), which from then on owns it: the ingress releases a
reservation only when the turn never reached a replica.

The replica meters every model call exactly once, whatever becomes of its turn:
- before each further model call of a turn, it *charges* the calls made so far (a
  ``UsageRecord``) and re-takes the reservation for the next call's estimate, in one control-store
  transaction that refuses the call when the day's budget cannot cover it (``Charge``);
- the turn's last calls go in one final record: in the same store transaction as the turn's
  commit (the session store's usage outbox) when it commits, or written to the outbox on its own
  when the turn fails, times out or is cancelled;
- the outbox is sent to the control store in batches and deleted once the control store took it;
  records a dead replica left there are sent by any other replica's sweep.

A record's ``id`` names its span of a turn's calls (a charge is ``<turn id>:<calls so far>``,
the final record ``<turn id>:end``), and the control store ignores ids it has metered, so a
record sent twice (a lost reply, a sweep racing the replica's own meter, a commit whose reply was
lost and whose turn is then metered as failed, a charge that did not answer and is sent again)
counts once. So a user's overshoot of ``tokens_per_day`` is at most one model call's worth per
concurrent turn: the budget is checked before every call, and only the call that then runs can
use more than its estimate (its input is not known in advance).

The types live here, not in ``serve_app``, so that a replica names them without loading the API.
They cross Ray's process boundary as pickles (plain frozen dataclasses) and the session store's
outbox as JSON (``usage_to_json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

# Longer than any turn may run (an agent's ``turn_timeout_s`` is at most an hour): a reservation
# that nobody ends (its replica died mid-turn) stops counting after this.
RESERVATION_TTL_S = 3_900.0

# Where a reservation is held: the control store's SQLite (``ControlGate``) or Redis
# (``RedisGate``). Re-taking one for a turn's next call happens where it is held.
HeldIn = Literal["control", "redis"]


# Characters per token in an estimate of a message's input tokens before it is sent: English prose
# and code run at 3 to 4.5 characters per token; the lower end errs towards holding more.
CHARS_PER_TOKEN = 3


def estimate_tokens(content: str | list[Any]) -> int:
    """A message's input tokens, estimated from its size before any model call (admission adds
    it to the turn's reservation, so that one large message cannot pass the budget on a
    reservation of ``max_tokens`` alone). Blocks count by their JSON: an image's base64 counts
    more than the image will, which errs towards holding more."""
    size = len(content) if isinstance(content, str) else len(json.dumps(content))
    return -(-size // CHARS_PER_TOKEN)


def utc_day(at_s: float) -> str:
    """The day a budget counts in: the UTC date of ``at_s`` (seconds since the epoch)."""
    return datetime.fromtimestamp(at_s, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Reservation:
    """``tokens`` of ``user_id``'s budget for ``day``, held by one turn until the turn is metered,
    a charge re-takes it for the turn's next call, or ``RESERVATION_TTL_S`` passes.

    ``id`` is unique. Ending one is idempotent in either place, so the control store ends a
    metered turn's reservation in both without asking which.
    """

    id: str
    user_id: str
    day: str
    tokens: int
    held_in: HeldIn = "control"


@dataclass(frozen=True)
class UsageRecord:
    """Usage of a span of one turn's model calls, as a replica meters it (``actors.meter``).

    ``id`` makes a record sent twice count once. ``turns`` is 1 on a turn's final record and 0
    on the charges before it, so a day's turn count counts each turn once. ``reservation`` is the
    one a final record ends (the API admitted the turn with it), or None (a charge, a batch job's
    turn, a user without a daily budget). A record with no usage and a reservation only ends the
    reservation (a turn that made no model call: a replay, a busy session)."""

    id: str
    user_id: str
    agent_id: str
    usage: Mapping[str, int]
    cost_usd: float
    reservation: Reservation | None = None
    turns: int = 1

    @property
    def tokens(self) -> int:
        return sum(int(v) for v in self.usage.values())


@dataclass(frozen=True)
class Charge:
    """What charging a turn's calls so far answered: the reservation re-taken for the next call,
    or why the day's budget refused it (the reservation then ended)."""

    reservation: Reservation | None
    refusal: str | None = None


def usage_to_json(record: UsageRecord) -> str:
    """A record as the session store's outbox keeps it."""
    data = asdict(record)
    data["usage"] = dict(record.usage)
    return json.dumps(data, separators=(",", ":"))


def usage_from_json(data: str | bytes) -> UsageRecord:
    raw: dict[str, Any] = json.loads(data)
    held = raw.pop("reservation", None)
    reservation = Reservation(**held) if held is not None else None
    return UsageRecord(**raw, reservation=reservation)
