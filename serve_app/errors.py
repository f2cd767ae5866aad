"""HTTP errors: the platform's errors (``hyperfleet.errors.HyperfleetError``) plus the API's own,
and the one JSON shape every error answer has: ``{"error": {"type": ..., "message": ...}}``.

Every error answer says whether resending the same request may succeed: the ``x-should-retry``
header (``true``/``false``, the header the Anthropic API sends and its SDKs obey), and a stream's
``error`` event its ``retryable`` field. With its idempotency key a resent message joins its turn
if it is still running, gets it if it committed, and runs it otherwise: never a second turn."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from hyperfleet.errors import HyperfleetError

# How soon to retry when the control store, a replica or Redis cannot be reached (restarting).
RESTARTING_RETRY_S = 2.0
# A replica whose process died: Ray restarts it in place in about a second, and a resend sent
# while it starts waits for it (a chaos run's replica kill, benchmarks/RESULTS.md).
REPLICA_DIED_RETRY_S = 1.0
RETRYABLE_STATUSES = frozenset({429, 503})  # an ``ApiError`` of these is retryable


class ApiError(HyperfleetError):
    """An error of the HTTP layer, with its own status and type."""

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        *,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.status_code = status_code
        self.error_type = error_type
        self.headers = headers or {}
        # Too many requests, or a backend restarting: later, the same request may pass.
        self.retryable = status_code in RETRYABLE_STATUSES

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (self.status_code, self.error_type, self.message, self.retry_after_s, self.headers),
        )


def _rebuild(
    status: int, kind: str, message: str, retry: float | None, headers: dict[str, str]
) -> ApiError:
    return ApiError(status, kind, message, retry_after_s=retry, headers=headers)


class QuotaExceededError(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(403, "quota_exceeded", message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (QuotaExceededError, (self.message,))


class OverBudgetError(QuotaExceededError):
    """The daily token budget refused a turn at admission: a quota's answer (the same 403 and
    type), told apart from the other quotas in the metrics."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (OverBudgetError, (self.message,))


def unavailable(
    what: str, error: BaseException, retry_after_s: float = RESTARTING_RETRY_S
) -> ApiError:
    """A backend that cannot be reached right now: 503, retry soon."""
    return ApiError(
        503,
        "unavailable",
        f"{what} is not reachable right now ({type(error).__name__})",
        retry_after_s=retry_after_s,
    )


def error_response(error: HyperfleetError) -> JSONResponse:
    headers = dict(getattr(error, "headers", {}) or {})
    if error.retry_after_s is not None:
        headers.setdefault("Retry-After", str(max(1, int(-(-error.retry_after_s // 1)))))
    headers["x-should-retry"] = "true" if error.retryable else "false"
    body = {"error": {"type": error.error_type, "message": error.message}}
    return JSONResponse(body, status_code=error.status_code, headers=headers)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")
