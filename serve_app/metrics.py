"""The ingress's metrics (``docs/observability.md``'s catalogue), kept by ``ray.util.metrics``.

What Ray does with them, and the ``HYPERFLEET_METRICS=0`` switch, are ``actors/metrics.py``'s.

Requests are counted by ``RequestMetrics``, an ASGI middleware around the app, labelled with the
template of the route Starlette matched (``/v1/sessions/{session_id}/messages``: the route table's,
``routes.ROUTES``), never the path a client sent; a path no route matches is ``unmatched``, and
a method outside the HTTP verbs is ``other``, so a client cannot make series. Its duration ends
at the answer's first byte (the status line: for an SSE turn, when its stream starts).

Refusals are counted where an error becomes an answer (``refused``): ``rejection_reason`` maps
the error a request ended with to the catalogue's reasons, or None for errors that are not a
refusal (a 404, a bad body).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from actors.metrics import SECONDS_BUCKETS, Instruments
from hyperfleet.errors import CapacityError, CircuitOpenError, HyperfleetError

from .errors import ApiError, OverBudgetError, QuotaExceededError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

RejectionReason = Literal[
    "rate", "auth", "quota", "budget", "capacity", "circuit", "unavailable"
]  # fmt: skip
SpawnOutcome = Literal["ready", "pending", "failed"]
StartFailure = Literal["timeout", "failed"]


@dataclass(frozen=True)
class _Ingress:
    requests: Any
    request_seconds: Any
    rejections: Any
    replica_start_seconds: Any
    replica_start_failures: Any
    agent_spawns: Any


def _make() -> _Ingress:
    from ray.util.metrics import Counter, Histogram

    seconds = list(SECONDS_BUCKETS)
    return _Ingress(
        requests=Counter(
            "hyperfleet_http_requests",
            "HTTP requests answered by the ingress",
            ("route", "method", "status_class"),
        ),
        request_seconds=Histogram(
            "hyperfleet_http_request_duration_seconds",
            "From a request's arrival at the ingress to its answer's first byte",
            seconds,
            ("route", "method"),
        ),
        rejections=Counter(
            "hyperfleet_admission_rejections", "Requests refused before any work", ("reason",)
        ),
        replica_start_seconds=Histogram(
            "hyperfleet_replica_start_seconds",
            "From the ingress asking for an agent's replicas to all of them answering",
            seconds,
        ),
        replica_start_failures=Counter(
            "hyperfleet_replica_start_failures", "Replicas that did not start", ("reason",)
        ),
        agent_spawns=Counter("hyperfleet_agent_spawns", "Agents created", ("outcome",)),
    )


_INGRESS = Instruments(_make)


# Labels ------------------------------------------------------------------------------------


def status_class(status: int) -> str:
    """``2xx`` .. ``5xx`` (anything else, which no handler answers, is ``5xx``)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def route_label(scope: Scope, templates: frozenset[str]) -> str:
    """The template of the route Starlette matched for ``scope`` (it sets ``scope["route"]``),
    if it is one of ``templates``; else ``unmatched``."""
    path = getattr(scope.get("route"), "path", None)
    return path if path in templates else UNMATCHED


def rejection_reason(error: BaseException) -> RejectionReason | None:
    """Why a request was refused, from the error it was answered with; None when the error is
    not a refusal (a 404, a bad body, a failed turn)."""
    if isinstance(error, OverBudgetError):
        return "budget"
    if isinstance(error, QuotaExceededError):
        return "quota"
    if isinstance(error, CapacityError):
        return "capacity"
    if isinstance(error, CircuitOpenError):
        return "circuit"
    if isinstance(error, ApiError) and error.status_code == 429:
        return "rate"
    if isinstance(error, ApiError) and error.status_code == 401:
        return "auth"
    if isinstance(error, HyperfleetError) and error.status_code == 503:
        return "unavailable"  # a backend restarting: the control store, a replica, Redis
    return None


# What the code calls -------------------------------------------------------------------------


def refused(error: BaseException) -> None:
    """Counts ``error`` if it refused the request (``rejection_reason``)."""
    reason = rejection_reason(error)
    if reason is None:
        return
    m = _INGRESS.get()
    if m is not None:
        m.rejections.inc(1, {"reason": reason})


def agent_spawned(outcome: SpawnOutcome, replicas: int, seconds: float | None = None) -> None:
    """An agent's ``replicas`` were asked for: all answered in ``seconds`` (``ready``), or not
    yet (``pending``: each counts as a ``timeout``), or they failed."""
    m = _INGRESS.get()
    if m is None:
        return
    m.agent_spawns.inc(1, {"outcome": outcome})
    if outcome == "ready" and seconds is not None:
        m.replica_start_seconds.observe(seconds)
    elif replicas > 0 and outcome != "ready":
        reason: StartFailure = "timeout" if outcome == "pending" else "failed"
        m.replica_start_failures.inc(replicas, {"reason": reason})


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request (see the module's docstring)."""

    def __init__(self, app: Asgi, templates: frozenset[str]) -> None:
        self.app = app
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _INGRESS.get() is None:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        answered = False

        async def timed_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self._record(scope, int(message["status"]), time.monotonic() - started)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            if not answered:  # Starlette's outermost handler answers it with a 500
                self._record(scope, 500, time.monotonic() - started)
            raise

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        m = _INGRESS.get()
        if m is None:
            return
        route = route_label(scope, self.templates)
        method = method_label(str(scope.get("method", "")))
        m.requests.inc(1, {"route": route, "method": method, "status_class": status_class(status)})
        m.request_seconds.observe(seconds, {"route": route, "method": method})
