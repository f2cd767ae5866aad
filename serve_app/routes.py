"""The API's one route table: each route's handler, how it is admitted, and what the OpenAPI
document says of it (``openapi.py`` builds the document from ``OPERATIONS``).

Three kinds of route: ``Open`` (no key, no limits), ``Keyed`` (admitted by ``Api.keyed``: the
client address's window, the key, its user's window) and ``TurnRoute`` (admitted by ``Api.turn``,
with the session's route and the turn's token reservation in the same step). Starlette matches
routes in order, so ``/v1/agents/spawn`` comes before ``/v1/agents/{agent_id}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from actors import AgentSpec
from hyperfleet.errors import HyperfleetError

from . import live, metrics, tracing
from .app import Api, Turn
from .errors import error_response
from .models import MessageIn, SpawnRequest, UserCreate, UserPatch
from .openapi import Operation, openapi_document
from .records import User

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Open:
    """A route with no key and no limits."""

    operation: Operation
    handler: Callable[[Api, Request], Awaitable[Response]]


@dataclass(frozen=True)
class Keyed:
    """A route behind admission: the client address's window, the key, then its user's window."""

    operation: Operation
    handler: Callable[[Api, Request, User], Awaitable[Response]]


@dataclass(frozen=True)
class TurnRoute:
    """Sending a message: ``Keyed``'s admission with the session's route and the turn's token
    reservation in the same step, after the body is validated."""

    operation: Operation
    handler: Callable[[Api, Request, Turn], Awaitable[Response]]


async def _openapi(api: Api, request: Request) -> Response:
    # OPERATIONS is defined below: read when the document is first asked for.
    return JSONResponse(openapi_document(OPERATIONS))


ROUTES: tuple[Open | Keyed | TurnRoute, ...] = (
    Open(Operation("get", "/health", "Liveness (no auth)", authenticated=False), Api.health),
    Open(
        Operation(
            "get",
            "/ready",
            "Readiness: control store and session store reachable",
            authenticated=False,
        ),
        Api.ready,
    ),
    Open(
        Operation("get", "/openapi.json", "This document", authenticated=False, documented=False),
        _openapi,
    ),
    Keyed(
        Operation(
            "post",
            "/v1/users",
            "Create a user (admin); returns its first API key once",
            UserCreate,
            201,
        ),
        Api.create_user,
    ),
    Keyed(Operation("get", "/v1/users/{user_id}", "A user (admin, or the user)"), Api.get_user),
    Keyed(
        Operation("patch", "/v1/users/{user_id}", "Change a user's quotas (admin)", UserPatch),
        Api.patch_user,
    ),
    Keyed(
        Operation("post", "/v1/users/{user_id}/keys", "Another API key, returned once", None, 201),
        Api.create_key,
    ),
    Keyed(
        Operation("delete", "/v1/keys/{prefix}", "Revoke a key (admin, or its user)"),
        Api.revoke_key,
    ),
    Keyed(
        Operation("post", "/v1/agents", "Create an agent from an AgentSpec", AgentSpec, 201),
        Api.create_agent,
    ),
    Keyed(Operation("get", "/v1/agents", "Your agents"), Api.list_agents),
    Keyed(
        Operation(
            "post",
            "/v1/agents/spawn",
            "Create an agent from resources and a model at the top level",
            SpawnRequest,
            201,
        ),
        Api.spawn_agent,
    ),
    Keyed(
        Operation("get", "/v1/agents/stats", "Agents, replicas, sessions and nodes"),
        Api.agent_stats,
    ),
    Keyed(Operation("get", "/v1/agents/{agent_id}", "An agent with its replicas"), Api.get_agent),
    Keyed(
        Operation("delete", "/v1/agents/{agent_id}", "Drain and remove an agent"),
        Api.delete_agent,
    ),
    Keyed(
        Operation("post", "/v1/agents/{agent_id}/sessions", "Open a session", None, 201),
        Api.create_session,
    ),
    Keyed(Operation("get", "/v1/sessions/{session_id}", "A session"), Api.get_session),
    Keyed(Operation("delete", "/v1/sessions/{session_id}", "Close a session"), Api.delete_session),
    Keyed(
        Operation(
            "get",
            "/v1/sessions/{session_id}/messages",
            "The transcript, paginated",
            query=("after", "limit"),
        ),
        Api.transcript,
    ),
    TurnRoute(
        Operation(
            "post",
            "/v1/sessions/{session_id}/messages",
            "Send a message: the turn as JSON, its events as SSE (stream), or 202 and its id "
            "(background); if_busy says what happens while a turn runs",
            MessageIn,
            idempotency_key=True,
            streams=True,
            accepted="Background turn admitted: {turn_id, session_id, status: queued | running}",
        ),
        Api.send_message,
    ),
    Keyed(
        Operation(
            "get",
            "/v1/sessions/{session_id}/events",
            "The session's events after Last-Event-ID (or ?after=), then live until it is idle "
            "(SSE; resumes a cut stream)",
            query=("after",),
            streams=True,
            last_event_id=True,
        ),
        live.session_events,
    ),
    Keyed(
        Operation(
            "get",
            "/v1/sessions/{session_id}/turns/{turn_id}",
            "A turn's status (queued, running, failed, completed, interrupted) and, once "
            "committed, the turn",
        ),
        live.turn_status,
    ),
    Keyed(Operation("get", "/v1/usage", "Your tokens and cost by agent and day"), Api.usage),
)
OPERATIONS = tuple(route.operation for route in ROUTES)
TEMPLATES = frozenset(operation.path for operation in OPERATIONS)  # the metrics' route labels


def endpoint(api: Api, route: Open | Keyed | TurnRoute) -> Endpoint:
    """The Starlette endpoint of ``route``, admitted as its kind says (a coroutine function:
    Starlette runs any other callable in a thread)."""
    if isinstance(route, Open):
        open_handler = route.handler

        async def open_endpoint(request: Request) -> Response:
            return await open_handler(api, request)

        return open_endpoint
    if isinstance(route, Keyed):
        keyed_handler = route.handler

        async def keyed_endpoint(request: Request) -> Response:
            return await api.keyed(request, keyed_handler)

        return keyed_endpoint
    turn_handler = route.handler

    async def turn_endpoint(request: Request) -> Response:
        return await api.turn(request, turn_handler)

    return turn_endpoint


def build_app(api: Api) -> Starlette:
    """The ASGI app serving ``api`` on ``ROUTES``, with the API's error answers."""
    routes = [
        Route(
            r.operation.path,
            endpoint(api, r),
            methods=[r.operation.method.upper()],
            include_in_schema=r.operation.documented,
        )
        for r in ROUTES
    ]

    async def on_platform_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HyperfleetError)
        metrics.refused(exc)  # a refusal raised by admission (429, 401) ends here
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"type": kind, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # The supervisory boundary: a bug must answer in the API's shape and be logged whole.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {"error": {"type": "internal_error", "message": "internal error"}}
        return JSONResponse(body, status_code=500)

    return Starlette(
        routes=routes,
        middleware=[
            Middleware(tracing.Traced),
            Middleware(metrics.RequestMetrics, templates=TEMPLATES),
        ],
        exception_handlers={
            HyperfleetError: on_platform_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
