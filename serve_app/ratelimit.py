"""Request rate limits per API key and per client IP, with the ``limits`` library.

The limiter's state lives where every ingress replica reaches it, so the limit holds across
replicas: by default in the control actor (``limits``' in-memory storage inside that one
process), or in Redis (``limits``' Redis storage) when the deployment has one. The strategy is
``limits``' moving window: exact, with no burst at window boundaries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window has room again

    def headers(self) -> dict[str, str]:
        headers = {
            "ratelimit-limit": str(self.limit),
            "ratelimit-remaining": str(self.remaining),
            "ratelimit-reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_s))
        return headers


class RateLimiter:
    def __init__(self) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, key: str, per_minute: int) -> Decision:
        item = RateLimitItemPerMinute(per_minute)
        allowed = self._limiter.hit(item, key)
        reset_at, remaining = self._limiter.get_window_stats(item, key)
        reset_s = max(0, math.ceil(reset_at - time.time()))
        return Decision(allowed, per_minute, max(0, remaining), reset_s)
