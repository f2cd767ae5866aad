"""The daily token budgets in Redis: their keys, and the mirror the control store writes them with.

``RedisGate`` (``admission.py``) reads a user's day from Redis in its admission script: the tokens
used (a counter) and the turns' reservations (a sorted set of members ``<id>:<tokens>`` scored by
their expiry). SQLite in the control store stays the record of usage: each time it meters turns
it sets the counter and ends the metered turns' reservations here (``RedisUsageMirror``), so the
gate in any ingress replica sees a turn as reserved or as used, never as neither.
"""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import RedisError

from hyperfleet.metering import Reservation

logger = logging.getLogger(__name__)

DAY_KEY_TTL_S = 3 * 86_400  # a day's keys outlive the day (a turn may commit after midnight)
MIRROR_TIMEOUT_S = 5.0


def used_key(user_id: str, day: str) -> str:
    """The Redis key of a user's tokens used on ``day`` (the control store mirrors it)."""
    return f"hf:used:{user_id}:{day}"


def reserved_key(user_id: str, day: str) -> str:
    """The Redis key of the reservations a user's turns hold on ``day``."""
    return f"hf:reserved:{user_id}:{day}"


def reservation_member(reservation: Reservation) -> str:
    """A reservation's member in its ``reserved_key`` set; the script sums the tokens from it."""
    return f"{reservation.id}:{reservation.tokens}"


class RedisUsageMirror:
    """Writes a user's metered day into Redis (a ``control.UsageMirror``). A failure is logged
    and not raised: the record is in SQLite, the user's next metered turn writes the counter
    again, and a reservation not ended here expires."""

    def __init__(self, redis_url: str) -> None:
        self._redis = Redis.from_url(
            redis_url, socket_timeout=MIRROR_TIMEOUT_S, socket_connect_timeout=MIRROR_TIMEOUT_S
        )

    def __call__(self, user_id: str, day: str, used: int, reservations: list[Reservation]) -> None:
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(used_key(user_id, day), used, ex=DAY_KEY_TTL_S)
                for reservation in reservations:
                    pipe.zrem(
                        reserved_key(reservation.user_id, reservation.day),
                        reservation_member(reservation),
                    )
                pipe.execute()
        except RedisError:
            logger.warning("could not mirror %s's usage to Redis", user_id, exc_info=True)
