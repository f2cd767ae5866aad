"""A circuit breaker per upstream credential.

Closed: calls pass; ``failure_threshold`` consecutive failures open it. Open: calls fail fast with
``CircuitOpenError`` carrying how long until it half-opens. Half-open after a cool-down: one
trial call passes; its success closes the breaker, its failure opens it again for twice as long
(``cooldown_s``, 5 s, doubling to ``max_cooldown_s``, 30 s). A short outage is over within about
one cool-down of the API's return, and a long one is probed once every 30 s per process: a fixed
30 s cool-down kept every turn refused for up to 30 s after the API was back.

A call goes through ``attempt()``, a context manager that records an outcome on every exit: the
call says ``succeeded()`` or ``failed()``, and a call that leaves any other way (the API refused
the request with a 4xx, which says nothing of its health; the turn was cancelled or timed out; a
bug) is neutral, and a half-open trial that ends so lets the next call be the trial. Without it,
a trial that left early kept the breaker refusing every call until the replica restarted.

One breaker per credential (``BreakerRegistry``): an outage of the API, or a revoked or
rate-limited key, is a property of the key, so every agent loop in a process that uses the same
key shares its breaker, and a key of one tenant never opens another's. Replicas in different
processes each keep their own: a breaker is a local guess, and sharing it would put a network
call in front of each model call.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

from hyperfleet.errors import CircuitOpenError

from . import metrics

FAILURE_THRESHOLD = 5
COOLDOWN_S = 5.0  # the first cool-down after the breaker opens
MAX_COOLDOWN_S = 30.0  # each failed trial doubles it, up to this
MAX_CREDENTIALS = 1_024  # breakers kept per process; the least recently used goes first


class Attempt:
    """One call through the breaker: it says how the call went before it leaves ``attempt``."""

    def __init__(self) -> None:
        self.outcome: Literal["success", "failure"] | None = None

    def succeeded(self) -> None:
        self.outcome = "success"

    def failed(self) -> None:
        self.outcome = "failure"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = FAILURE_THRESHOLD,
        cooldown_s: float = COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        max_cooldown_s: float = MAX_COOLDOWN_S,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)
        self._cooldown_s = cooldown_s  # the present one: doubled by each failed trial
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._cooldown_s:
            return "half_open"
        return "open"

    @contextlib.contextmanager
    def attempt(self) -> Iterator[Attempt]:
        """Lets one call through (or raises ``CircuitOpenError``) and records its outcome
        however it leaves: ``failed()`` counts a failure, ``succeeded()`` closes the breaker,
        and neither (an exception included) releases a half-open trial without a verdict."""
        trial = self.check()
        attempt = Attempt()
        try:
            yield attempt
        finally:
            if attempt.outcome == "success":
                self.record_success()
            elif attempt.outcome == "failure":
                self.record_failure(trial)
            elif trial:
                self._trial_running = False

    def check(self) -> bool:
        """Raises ``CircuitOpenError`` unless a call may go through now; True when that call is
        the half-open trial, whose outcome must then be recorded (``attempt`` does)."""
        state = self.state
        if state == "closed":
            return False
        if state == "half_open" and not self._trial_running:
            self._trial_running = True
            return True
        assert self._opened_at is not None
        wait_s = max(0.0, self._cooldown_s - (self._clock() - self._opened_at))
        raise CircuitOpenError(
            f"the model API failed {self._failures} times in a row; retrying after a cool-down",
            retry_after_s=round(wait_s if state == "open" else 1.0, 3),
        )

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_running = False
        self._cooldown_s = self.cooldown_s

    def record_failure(self, trial: bool | None = None) -> None:
        """Counts a failure; ``trial`` says whether it was the half-open trial's (None: whether
        a trial is running), which opens the breaker again at once."""
        self._failures += 1
        was_trial = self._trial_running if trial is None else trial
        if was_trial:
            self._trial_running = False
            self._cooldown_s = min(self.max_cooldown_s, self._cooldown_s * 2)
        if was_trial or (self._opened_at is None and self._failures >= self.failure_threshold):
            metrics.circuit_opened()
            self._opened_at = self._clock()
        # A call that was in flight when the breaker opened and fails late moves nothing: it
        # would push the half-open trial back by a whole cool-down after the API came back.


class BreakerRegistry:
    """The breaker of each credential a process uses, keyed by a SHA-256 of the credential (no
    plaintext key is kept), at most ``max_credentials`` of them."""

    def __init__(
        self,
        max_credentials: int = MAX_CREDENTIALS,
        make: Callable[[], CircuitBreaker] = CircuitBreaker,
    ) -> None:
        self._max = max_credentials
        self._make = make
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()

    def __len__(self) -> int:
        return len(self._breakers)

    def for_credential(self, credential: str) -> CircuitBreaker:
        digest = hashlib.sha256(credential.encode()).hexdigest()
        breaker = self._breakers.get(digest)
        if breaker is None:
            breaker = self._breakers[digest] = self._make()
            while len(self._breakers) > self._max:
                # A loop still holding an evicted breaker keeps using it; a new loop for that
                # credential starts with a fresh one.
                self._breakers.popitem(last=False)
        self._breakers.move_to_end(digest)
        return breaker


BREAKERS = BreakerRegistry()  # this process's: replicas' loops take theirs from here
