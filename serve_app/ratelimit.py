"""Request rate limits per user and per client address: moving windows, and what they decide.

Two stores keep the windows, one per admission gate (``admission.py``): this module's
``MovingWindows``, in the control-store actor's memory (``ControlGate``; exact across ingress
replicas because that one actor serialises every call), and the Lua script ``_ADMIT`` in Redis
(``RedisGate``). Both run the same algorithm, and one conformance suite
(``tests/integration/test_admission_conformance.py``) drives both through the same sequences:

- A window admits at most ``limit`` requests in any ``WINDOW_MS``: a request arriving at ``now``
  counts the admitted requests with arrival time in ``(now - WINDOW_MS, now]``. Time is in whole
  milliseconds, as Redis's ``TIME`` gives it.
- A refused request is not recorded (in that window or in any window checked after it).
- An admitted request's reset is when its window's oldest entry leaves it; a refused one's is when
  enough entries have left for one more (a window may hold more than its limit after the limit
  was lowered). Seconds, rounded up.
- A user's ``requests_per_minute`` is one window per user (``user_window``), whichever of the
  user's keys a request carries: a window per key let a user multiply the quota by minting keys.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_MS = 60_000  # requests per minute
SWEEP_EVERY = 10_000  # hits: then windows with nothing left in them are dropped


def user_window(user_id: str) -> str:
    """The name of a user's ``requests_per_minute`` window, the same in both stores."""
    return "hf:rl:user:" + user_id


@dataclass(frozen=True)
class Decision:
    """One window's answer to one request (the last window checked)."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window has room again

    def headers(self) -> dict[str, str]:
        if self == NOT_LIMITED:  # equal, not identical: a decision crosses Ray as a copy
            return {}
        headers = {
            "ratelimit-limit": str(self.limit),
            "ratelimit-remaining": str(self.remaining),
            "ratelimit-reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_s))
        return headers


# The answer for a request that no window counted: one from an exempt address with no key or
# an unknown one (a keyed request is counted in its user's window). No rate-limit headers.
NOT_LIMITED = Decision(True, 0, 0, 0)


class MovingWindows:
    """Moving windows by key, in this process's memory. Not thread-safe: one caller at a time (the
    control-store actor runs one call at a time).

    ``clock`` gives seconds since the epoch (tests pass a fake one). Memory is bounded by the keys
    seen in the last minute, each holding at most its limit of arrival times (or a limit since
    lowered): every ``SWEEP_EVERY`` hits, windows with nothing left in them are dropped.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, collections.deque[int]] = {}
        self._hits = 0

    def __len__(self) -> int:
        """How many windows are held."""
        return len(self._windows)

    def hit(self, key: str, limit: int) -> Decision:
        """Records a request in ``key``'s window if it has room for it; says which it did."""
        now = int(self._clock() * 1000)
        self._hits += 1
        if self._hits % SWEEP_EVERY == 0:
            self._sweep(now)
        window = self._windows.setdefault(key, collections.deque())
        while window and window[0] <= now - WINDOW_MS:
            window.popleft()
        count = len(window)
        if count >= limit:
            frees = window[count - limit]  # when it leaves, one more fits
            return Decision(False, limit, 0, _seconds(frees + WINDOW_MS - now))
        window.append(now)
        return Decision(True, limit, limit - count - 1, _seconds(window[0] + WINDOW_MS - now))

    def _sweep(self, now: int) -> None:
        for key in [k for k, w in self._windows.items() if not w or w[-1] <= now - WINDOW_MS]:
            del self._windows[key]


def _seconds(ms: int) -> int:
    return math.ceil(ms / 1000)
