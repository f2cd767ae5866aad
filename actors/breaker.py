"""A circuit breaker per upstream credential.

Closed: calls pass; ``failure_threshold`` consecutive failures open it. Open: calls fail fast with
``CircuitOpenError`` carrying how long until it half-opens. Half-open after ``cooldown_s``: one
trial call passes; its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from hyperfleet.errors import CircuitOpenError

FAILURE_THRESHOLD = 5
COOLDOWN_S = 30.0


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = FAILURE_THRESHOLD,
        cooldown_s: float = COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def check(self) -> None:
        """Raises ``CircuitOpenError`` unless a call may go through now."""
        state = self.state
        if state == "closed":
            return
        if state == "half_open" and not self._trial_running:
            self._trial_running = True
            return
        assert self._opened_at is not None
        wait_s = max(0.0, self.cooldown_s - (self._clock() - self._opened_at))
        raise CircuitOpenError(
            f"the model API failed {self._failures} times in a row; retrying after a cool-down",
            retry_after_s=round(wait_s if state == "open" else 1.0, 3),
        )

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_running = False

    def record_failure(self) -> None:
        self._failures += 1
        was_trial = self._trial_running
        self._trial_running = False
        if was_trial or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
