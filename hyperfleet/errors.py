"""Hyperfleet's errors: one rooted hierarchy, each carrying what a caller needs to decide.

    HyperfleetError                    status_code, retryable, retry_after_s
    ├── InvalidRequestError            400: bad input (an unknown tool, a malformed spec)
    ├── NotFoundError                  404: no such session or agent (or not yours)
    ├── ConflictError                  409
    │   ├── SessionBusyError           a turn is already running in the session
    │   └── IdempotencyConflictError   the key was used for a different message
    ├── StaleSessionError              409: a commit's session version is behind the store's
    ├── TurnQueueFullError             429 + retry_after_s: the session's queue of waiting turns
    │                                  is full (``if_busy: "enqueue"``)
    ├── TurnLostError                  503: a resumed stream's turn ended without a commit (its
    │                                  replica stopped mid-turn); send the message again
    ├── StreamLaggedError              503: a follower fell too far behind the live events;
    │                                  resume from the last event id
    ├── BudgetExceededError            403: the day's token budget cannot cover a turn's next call
    ├── CapacityError                  503 + retry_after_s: the replica is full or draining
    │   └── SessionMovedError          the replica is draining: the session is re-homed, resend
    ├── UpstreamError                  502: the model API failed the turn (resend: it may pass)
    │   ├── UpstreamRefusedError       502: the model API refused the request (a 4xx; resending
    │   │                              the same request fails the same way)
    │   ├── TurnTimeoutError           502: the turn ran past its turn_timeout_s (a resend would
    │   │                              run the whole turn again, likely as long)
    │   └── CircuitOpenError           503 + retry_after_s: the credential's breaker is open
    └── StoreError                     503: the session store could not be reached

Errors cross Ray's process boundary, so each pickles to the same type and fields.
"""

from __future__ import annotations

from typing import Any


class HyperfleetError(Exception):
    status_code = 500
    error_type = "api_error"
    retryable = False

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, session_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.session_id = session_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.retry_after_s, self.session_id))

    def to_json(self) -> dict[str, Any]:
        """A stream's ``error`` event data: type, message, whether a resend may pass, and how
        soon."""
        body: dict[str, Any] = {
            "type": self.error_type,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body


def _rebuild(
    cls: type[HyperfleetError], message: str, retry_after_s: float | None, session_id: str | None
) -> HyperfleetError:
    return cls(message, retry_after_s=retry_after_s, session_id=session_id)


class InvalidRequestError(HyperfleetError):
    status_code = 400
    error_type = "invalid_request"


class NotFoundError(HyperfleetError):
    status_code = 404
    error_type = "not_found"


class ConflictError(HyperfleetError):
    status_code = 409
    error_type = "conflict"


class SessionBusyError(ConflictError):
    error_type = "session_busy"
    retryable = True


class IdempotencyConflictError(ConflictError):
    error_type = "idempotency_conflict"


class StaleSessionError(HyperfleetError):
    status_code = 409
    error_type = "stale_session"
    retryable = True


class TurnQueueFullError(HyperfleetError):
    status_code = 429
    error_type = "turn_queue_full"
    retryable = True


class TurnLostError(HyperfleetError):
    status_code = 503
    error_type = "turn_lost"
    retryable = True


class StreamLaggedError(HyperfleetError):
    status_code = 503
    error_type = "stream_lagged"
    retryable = True


class CapacityError(HyperfleetError):
    status_code = 503
    error_type = "capacity_exhausted"
    retryable = True


class SessionMovedError(CapacityError):
    """The replica is draining (scaled down) and did nothing with the request: the caller moves
    the session to another replica and sends it again. A turn's reservation stays the caller's."""

    error_type = "session_moved"


class UpstreamError(HyperfleetError):
    status_code = 502
    error_type = "upstream_error"
    retryable = True


class UpstreamRefusedError(UpstreamError):
    """The model API answered the turn's request with a 4xx (too long, malformed, a bad key):
    the same request would be refused again, so it is not retryable."""

    retryable = False


class TurnTimeoutError(UpstreamError):
    """The turn ran past the agent's ``turn_timeout_s``: not retryable, since a resend runs the
    whole turn (its tools and model calls) again and likely runs as long."""

    retryable = False


class CircuitOpenError(UpstreamError):
    status_code = 503
    error_type = "circuit_open"


class StoreError(HyperfleetError):
    status_code = 503
    error_type = "store_unavailable"
    retryable = True


class BudgetExceededError(HyperfleetError):
    """The user's daily token budget cannot cover a turn's next model call (admission's refusal
    is the same type, from the API)."""

    status_code = 403
    error_type = "quota_exceeded"
