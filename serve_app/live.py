"""Live sessions over HTTP: a streamed turn, a resumable stream of a session's events, and a
turn's status.

Event ids are the session's sequence numbers (``actors.session``). A stream cut anywhere is
resumed with ``GET /v1/sessions/{id}/events`` and ``Last-Event-ID`` (what a browser's
``EventSource`` sends when it reconnects) or ``?after=``: the session's replica replays what
followed from its memory (the running turn and the one before) or from the store (committed
turns carry their events), then follows the running turn live. The header wins over the query
parameter: an ``EventSource`` keeps its first URL and sends the header with its latest id.

A stream never ends silently on a failure: a replica that cannot be reached after events went out
ends the stream with an ``error`` event (``retryable``), and the resume tells the committed
outcome or ``turn_lost``. Events of one request only (a refusal before its turn began) carry no
``id``, so they do not move a client's ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from hyperfleet.errors import HyperfleetError, SessionMovedError
from hyperfleet.metering import Reservation

from . import metrics
from .admission import Gate
from .errors import ApiError
from .homes import MOVES_MAX, Homes
from .inputs import int_param
from .records import Route, User
from .replicas import Message, Replicas

logger = logging.getLogger(__name__)

MAX_EVENT_ID = 2**53 - 1  # what a JavaScript client can hold exactly


class Api(Protocol):
    """What these handlers use of ``app.Api``."""

    replicas: Replicas
    homes: Homes
    gate: Gate

    async def route_of(self, session_id: str, user: User) -> Route: ...

    def forget_unreachable(self, error: BaseException, session_id: str) -> None: ...


class Turn(Protocol):
    """What a streamed turn needs of ``app.Turn``."""

    @property
    def route(self) -> Route: ...

    @property
    def reservation(self) -> Reservation | None: ...

    @property
    def message(self) -> Message: ...


def sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event["data"], separators=(",", ":"))
    seq = event.get("seq")
    head = f"event: {event['type']}\n" + ("" if seq is None else f"id: {seq}\n")
    return f"{head}data: {data}\n\n".encode()


def _error_event(error: HyperfleetError) -> bytes:
    return sse(
        {
            "type": "error",
            "seq": None,
            "data": {"status_code": error.status_code, **error.to_json()},
        }
    )


async def _followed(
    api: Api,
    route: Route,
    opened: Callable[[Route], AsyncIterator[dict[str, Any]]],
    on_refused: Callable[[HyperfleetError], None] | None = None,
) -> AsyncIterator[bytes]:
    """``opened``'s events as SSE. Before the first event, a replica that is draining or gone
    is followed to the session's new home; after it, a failure is the stream's last event."""
    for attempt in range(MOVES_MAX + 1):
        started = False
        try:
            async for event in opened(route):
                started = True
                yield sse(event)
            return
        except HyperfleetError as e:
            moved = None if started or attempt == MOVES_MAX else await api.homes.follow(route, e)
            if moved is not None:
                route = moved
                continue
            if on_refused is not None:
                on_refused(e)
            metrics.refused(e)
            api.forget_unreachable(e, route.id)
            yield _error_event(e)
            return
        except Exception:
            # A supervisory boundary: a stream never ends without saying why.
            logger.exception("the stream of session %s failed", route.id)
            yield _error_event(ApiError(500, "internal_error", "the stream failed; resume it"))
            return


def stream_turn(api: Api, turn: Turn) -> Response:
    """``POST .../messages`` with ``stream``: the turn's events as they happen."""

    def refused(error: HyperfleetError) -> None:
        if isinstance(error, SessionMovedError):  # no replica took the turn
            api.gate.release(turn.reservation)

    events = _followed(api, turn.route, lambda r: api.replicas.stream(r, turn.message), refused)
    return StreamingResponse(events, media_type="text/event-stream")


def _after(request: Request) -> int:
    header = request.headers.get("last-event-id")
    if header is None:
        return int_param(request, "after", 0, 0, MAX_EVENT_ID)
    try:
        after = int(header)
    except ValueError:
        after = -1
    if not 0 <= after <= MAX_EVENT_ID:
        raise ApiError(400, "invalid_request", "Last-Event-ID must be an event id (an integer)")
    return after


async def session_events(api: Api, request: Request, user: User) -> Response:
    """``GET /v1/sessions/{id}/events``: the events after ``Last-Event-ID`` (or ``?after=``),
    then live while a turn runs; at once when nothing is running and nothing follows."""
    route = await api.route_of(request.path_params["session_id"], user)
    after = _after(request)
    events = _followed(api, route, lambda r: api.replicas.events(r, user.id, after))
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def turn_status(api: Api, request: Request, user: User) -> Response:
    """``GET /v1/sessions/{id}/turns/{turn_id}``: queued, running, failed, completed or
    interrupted, with the turn once it committed."""
    route = await api.route_of(request.path_params["session_id"], user)
    turn_id = request.path_params["turn_id"]
    status = await api.homes.at_home(route, lambda r: api.replicas.turn_status(r, turn_id, user.id))
    if status.get("turn") is not None:
        status["turn"] = public_turn(status["turn"])
    return JSONResponse(status)


def public_turn(turn: dict[str, Any]) -> dict[str, Any]:
    keys = ("turn_id", "session_id", "index", "content", "stop_reason", "usage", "cost_usd")
    return {k: turn[k] for k in keys} | {"replayed": bool(turn.get("replayed"))}
