"""The control store's usage tables, as SQL, and the interface of where else a metered day is
written (``UsageMirror``: Redis, for ``RedisGate``). ``control.ControlStore`` uses both.
"""

from __future__ import annotations

from typing import Protocol

from hyperfleet.metering import Reservation

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)
# A replica resends a batch within seconds, and a sweep within minutes; record ids are kept far
# longer than that.
METERED_TURNS_KEPT_S = 2 * 86_400.0
PRUNE_METERED_EVERY = 1_000  # batches
# Adds a record's tokens, cost and turns to its user's, agent's and day's row.
ADD_USAGE = (
    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (user_id, agent_id, day) DO UPDATE SET "
    "input_tokens = input_tokens + excluded.input_tokens, "
    "output_tokens = output_tokens + excluded.output_tokens, "
    "cache_read_input_tokens = cache_read_input_tokens + excluded.cache_read_input_tokens, "
    "cache_creation_input_tokens = cache_creation_input_tokens + "
    "excluded.cache_creation_input_tokens, "
    "cost_usd = cost_usd + excluded.cost_usd, turns = turns + excluded.turns"
)


class UsageMirror(Protocol):
    """Where else a user's day is written after the control store meters turns (``RedisGate``
    reads budgets there; ``redis_budget.RedisUsageMirror``)."""

    def __call__(self, user_id: str, day: str, used: int, reservations: list[Reservation]) -> None:
        """The day's used tokens, and the metered turns' reservations, to end."""

    def retake(
        self, reservation: Reservation, used: int, tokens: int, budget: int, now: float
    ) -> tuple[Reservation | None, int]:
        """Writes the day's used tokens and re-takes ``reservation`` (held there) as ``tokens``
        if used + the user's other reservations + ``tokens`` fit ``budget``, else ends it:
        (the reservation re-taken or None, the other reservations' tokens)."""
        ...
