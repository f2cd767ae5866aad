"""The daily token budgets in Redis: their keys, and the mirror the control store writes them with.

``RedisGate`` (``admission.py``) reads a user's day from Redis in its admission script: the tokens
used (a counter) and the turns' reservations (a sorted set of members ``<id>:<tokens>`` scored by
their expiry). SQLite in the control store stays the record of usage: each time it meters turns
it sets the counter and ends the metered turns' reservations here (``RedisUsageMirror``), so the
gate in any ingress replica sees a turn as reserved or as used, never as neither.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from redis import Redis
from redis.exceptions import RedisError

from hyperfleet.errors import StoreError
from hyperfleet.metering import RESERVATION_TTL_S, Reservation, utc_day

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


# Removes a reservation by its id, whatever tokens its member says: a charge may have re-taken it
# with other tokens without its turn learning so (the charge's reply was lost). Members are
# "<id>:<tokens>"; ids hold no colon. A user's day holds one member per running turn.
_REMOVE_ID = """
local prefix = ARGV[1] .. ':'
for _, held in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(held, 1, #prefix) == prefix then redis.call('ZREM', KEYS[1], held) end
end
"""

# Re-takes a turn's reservation for its next model call (``ControlStore.charge``), atomically with
# the admission script's reads of the same keys. KEYS: today's used counter, the reservations of
# the reservation's day, today's reservations (the same key but after midnight). ARGV: used, the
# reservation's id, the new member, its tokens, the budget, its expiry (s), now (s), day key ttl
# (s). Returns {1 if re-taken else 0, the other reservations' tokens}.
_RETAKE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[8])
local prefix = ARGV[2] .. ':'
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  for _, held in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(held, 1, #prefix) == prefix then redis.call('ZREM', key, held) end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[7])
local others = 0
for _, held in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  others = others + tonumber(string.match(held, ':(%d+)$'))
end
if tonumber(ARGV[1]) + others + tonumber(ARGV[4]) > tonumber(ARGV[5]) then
  return {0, others}
end
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[8])
return {1, others}
"""


class RedisUsageMirror:
    """Writes a user's metered day into Redis (a ``usage_sql.UsageMirror``). A failure is logged
    and not raised: the record is in SQLite, the user's next metered turn writes the counter
    again, and a reservation not ended here expires."""

    def __init__(self, redis_url: str) -> None:
        self._redis = Redis.from_url(
            redis_url, socket_timeout=MIRROR_TIMEOUT_S, socket_connect_timeout=MIRROR_TIMEOUT_S
        )
        self._retake = self._redis.register_script(_RETAKE)
        self._remove_id = self._redis.register_script(_REMOVE_ID)

    def retake(
        self, reservation: Reservation, used: int, tokens: int, budget: int, now: float
    ) -> tuple[Reservation | None, int]:
        """Re-takes a reservation held in Redis (``usage_sql.UsageMirror.retake``), under today's
        day (a turn that runs past midnight holds today's budget). ``now`` is the control
        store's clock, not Redis's: a difference between the two moves an expiry that is an hour
        away by as much."""
        day = utc_day(now)
        retaken = replace(reservation, tokens=tokens, day=day)
        keys = [used_key(reservation.user_id, day)]
        keys += [reserved_key(reservation.user_id, reservation.day)]
        keys += [reserved_key(reservation.user_id, day)]
        args: list[int | float | str] = [used, reservation.id, reservation_member(retaken)]
        args += [tokens, budget, now + RESERVATION_TTL_S, now, DAY_KEY_TTL_S]
        try:
            ok, others = self._retake(keys=keys, args=args)
        except RedisError as e:
            raise StoreError(f"the budget in Redis could not be read: {e}") from e
        return (retaken if ok else None), int(others)

    def __call__(self, user_id: str, day: str, used: int, reservations: list[Reservation]) -> None:
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(used_key(user_id, day), used, ex=DAY_KEY_TTL_S)
                for reservation in reservations:
                    key = reserved_key(reservation.user_id, reservation.day)
                    self._remove_id(keys=[key], args=[reservation.id], client=pipe)
                pipe.execute()
        except RedisError:
            logger.warning("could not mirror %s's usage to Redis", user_id, exc_info=True)
