"""The HTTP API: a Starlette app that authenticates, limits, validates and routes to replicas.

Stateless: everything that must hold across ingress replicas (keys, rate-limit windows, quotas,
session routes, usage) is in the control store; replica handles and agent specs are cached. Every
error answer is ``{"error": {"type", "message"}}`` with the right status; another user's agent or
session is a 404 on every route, never a 403, so existence is not revealed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from actors import AgentSpec, HyperfleetError
from actors.tools import CustomToolError, check_custom_tools

from .admission import Gate
from .backend import Control, Replicas
from .errors import ApiError, error_response, not_found
from .models import MessageIn, Quotas, SpawnRequest, UserCreate, UserPatch
from .openapi import openapi_document

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
DRAIN_S = 30.0
TRANSCRIPT_LIMIT_MAX = 200
Handler = Callable[[Request], Awaitable[Response]]


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from e
    if _depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], body: Any) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "validation_error", f"{where}: {first['msg']}") from e


def _key_of(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event["data"], separators=(",", ":"))
    return f"event: {event['type']}\nid: {event['seq']}\ndata: {data}\n\n".encode()


class Api:
    def __init__(
        self, control: Control, replicas: Replicas, gate: Gate, ip_per_minute: int = 100
    ) -> None:
        self.control = control
        self.replicas = replicas
        self.gate = gate
        self.ip_per_minute = ip_per_minute
        self._specs: dict[str, AgentSpec] = {}

    # Cross-cutting --------------------------------------------------------------------------

    async def _admit(self, request: Request) -> tuple[dict[str, Any], dict[str, str]]:
        """Rate limits and the key: the caller, and rate-limit headers for the answer."""
        client = request.client.host if request.client else "unknown"
        key = _key_of(request)
        user, decision = await self.gate.admit(key, client, self.ip_per_minute)
        return self._check_admission(user, decision, request)

    @staticmethod
    def _check_admission(
        user: dict[str, Any] | None, decision: Any, request: Request
    ) -> tuple[dict[str, Any], dict[str, str]]:
        headers: dict[str, str] = decision.headers()
        if not decision.allowed:
            raise ApiError(429, "rate_limited", "too many requests; slow down", headers=headers)
        if user is None:
            message = "missing API key" if _key_of(request) is None else "invalid API key"
            raise ApiError(401, "unauthorized", message)
        return user, headers

    @staticmethod
    def _require_admin(user: dict[str, Any]) -> None:
        if not user["is_admin"]:
            raise ApiError(403, "forbidden", "this route is for administrators")

    async def _agent(self, agent_id: str, user: dict[str, Any]) -> dict[str, Any]:
        agent: dict[str, Any] | None = await self.control.call("get_agent", agent_id)
        if agent is None or agent["owner"] != user["id"]:
            raise not_found(f"agent {agent_id}")
        return agent

    async def _spec(self, agent: dict[str, Any]) -> AgentSpec:
        spec = self._specs.get(agent["id"])
        if spec is None:
            spec = AgentSpec.model_validate_json(agent["spec"])
            self._specs[agent["id"]] = spec
        return spec

    async def _route(self, session_id: str, user: dict[str, Any]) -> dict[str, Any]:
        route: dict[str, Any] | None = await self.control.call("get_route", session_id)
        if route is None or route["owner"] != user["id"]:
            raise not_found(f"session {session_id}")
        return route

    # Ops ------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            await self.control.call("has_admin")
            checks["control_store"] = "ok"
        except HyperfleetError as e:
            checks["control_store"] = e.message
        from actors.store.actor import ActorSessionStore

        try:
            await ActorSessionStore(timeout_s=5).ping()
            checks["session_store"] = "ok"
        except HyperfleetError as e:
            checks["session_store"] = e.message
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    # Users and keys -------------------------------------------------------------------------

    async def create_user(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        self._require_admin(user)
        body = _validate(UserCreate, await _json_body(request))
        user_id = "usr_" + uuid.uuid4().hex[:16]
        created = await self.control.call(
            "create_user", user_id, body.name, body.quotas.model_dump()
        )
        key = await self.control.call("issue_key", user_id)
        out = {"id": user_id, "name": created["name"], "api_key": key["api_key"]}
        out["quotas"] = created["quotas"]
        return JSONResponse(out, status_code=201, headers=headers)

    async def _user_for(
        self, request: Request
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
        caller, headers = await self._admit(request)
        user_id = request.path_params["user_id"]
        target = await self.control.call("get_user", user_id)
        if target is None or (not caller["is_admin"] and caller["id"] != user_id):
            raise not_found(f"user {user_id}")
        return caller, target, headers

    async def get_user(self, request: Request) -> Response:
        _, target, headers = await self._user_for(request)
        return JSONResponse(_public_user(target), headers=headers)

    async def patch_user(self, request: Request) -> Response:
        caller, target, headers = await self._user_for(request)
        self._require_admin(caller)
        patch = _validate(UserPatch, await _json_body(request))
        quotas = Quotas.model_validate(
            {**target["quotas"], **patch.quotas.model_dump(exclude_unset=True)}
        )
        updated = await self.control.call("set_quotas", target["id"], quotas.model_dump())
        return JSONResponse(_public_user(updated), headers=headers)

    async def create_key(self, request: Request) -> Response:
        _, target, headers = await self._user_for(request)
        key = await self.control.call("issue_key", target["id"])
        return JSONResponse(key, status_code=201, headers=headers)

    async def revoke_key(self, request: Request) -> Response:
        caller, headers = await self._admit(request)
        prefix = request.path_params["prefix"]
        requester = None if caller["is_admin"] else caller["id"]
        if not await self.control.call("revoke_key", prefix, requester):
            raise not_found(f"key {prefix}")
        self.gate.forget_key(prefix)
        return JSONResponse({"prefix": prefix, "revoked": True}, headers=headers)

    # Agents ---------------------------------------------------------------------------------

    async def create_agent(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        spec = _validate(AgentSpec, await _json_body(request))
        return await self._create_agent(user, spec, headers)

    async def spawn_agent(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        body = _validate(SpawnRequest, await _json_body(request))
        try:
            spec = body.to_spec()
        except ValidationError as e:
            raise ApiError(422, "validation_error", str(e.errors()[0]["msg"])) from e
        return await self._create_agent(user, spec, headers)

    async def _create_agent(
        self, user: dict[str, Any], spec: AgentSpec, headers: dict[str, str]
    ) -> Response:
        try:
            check_custom_tools(spec.tools, self.replicas.runtime.custom_tools)
        except CustomToolError as e:
            raise ApiError(422, "validation_error", f"tools: {e}") from e
        agent_id = "agt_" + uuid.uuid4().hex[:16]
        count = max(1, spec.replicas.min)
        max_agents = int(user["quotas"].get("max_agents", 50))
        spec_json = spec.model_dump_json()
        if spec.anthropic_api_key is not None:  # stored for the replicas, never shown
            data = json.loads(spec_json)
            data["anthropic_api_key"] = spec.anthropic_api_key.get_secret_value()
            spec_json = json.dumps(data)
        await self.control.call("create_agent", agent_id, user["id"], spec_json, count, max_agents)
        self._specs[agent_id] = spec
        try:
            ready = await self.replicas.spawn(agent_id, spec, count)
        except ApiError:
            await self.control.call("set_agent_status", agent_id, "deleted")
            raise
        status = "ready" if ready else "pending"
        await self.control.call("set_agent_status", agent_id, status)
        body = {"id": agent_id, "status": status, **spec.public_json(), "replica_count": count}
        return JSONResponse(body, status_code=201, headers=headers)

    async def list_agents(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        agents = await self.control.call("list_agents", user["id"])
        data = [await self._agent_summary(a) for a in agents]
        return JSONResponse({"data": data}, headers=headers)

    async def _agent_summary(self, agent: dict[str, Any]) -> dict[str, Any]:
        spec = await self._spec(agent)
        return {
            "id": agent["id"],
            "status": agent["status"],
            "created_at": agent["created_at"],
            **spec.public_json(),
            "replica_count": agent["replicas"],
        }

    async def get_agent(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        agent = await self._agent(request.path_params["agent_id"], user)
        stats = await self.replicas.stats(agent["id"], agent["replicas"])
        body = await self._agent_summary(agent)
        body["replica_bounds"] = body.pop("replicas")
        body["replicas"] = [
            {k: s.get(k) for k in ("replica", "node_id", "sessions", "capacity", "draining")}
            | ({"state": s["state"]} if "state" in s else {"state": "running"})
            for s in stats
        ]
        body["sessions"] = sum(int(s.get("sessions") or 0) for s in stats)
        body["capacity"] = sum(int(s.get("capacity") or 0) for s in stats)
        return JSONResponse(body, headers=headers)

    async def delete_agent(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        agent = await self._agent(request.path_params["agent_id"], user)
        await self.control.call("set_agent_status", agent["id"], "draining")
        await self.replicas.remove(agent["id"], agent["replicas"], DRAIN_S)
        await self.control.call("set_agent_status", agent["id"], "deleted")
        self._specs.pop(agent["id"], None)
        self.gate.forget_routes(agent_id=agent["id"])
        return JSONResponse({"id": agent["id"], "status": "deleted"}, headers=headers)

    async def agent_stats(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        agents = await self.control.call("list_agents", user["id"])
        per_node: dict[str, int] = {}
        replicas = active = capacity = 0
        for agent in agents:
            for stats in await self.replicas.stats(agent["id"], agent["replicas"]):
                replicas += 1
                active += int(stats.get("sessions") or 0)
                capacity += int(stats.get("capacity") or 0)
                node = stats.get("node_id") or "unplaced"
                per_node[node] = per_node.get(node, 0) + 1
        body = {
            "agents": len(agents),
            "replicas": replicas,
            "sessions": {"active": active, "capacity": capacity},
            "per_node": per_node,
        }
        return JSONResponse(body, headers=headers)

    # Sessions -------------------------------------------------------------------------------

    async def create_session(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        agent = await self._agent(request.path_params["agent_id"], user)
        load = await self.control.call("sessions_per_replica", agent["id"])
        order = sorted(range(agent["replicas"]), key=lambda i: load.get(i, 0))
        last: HyperfleetError | None = None
        for index in order:
            try:
                session = await self.replicas.call(
                    agent["id"], index, "open_session", user["id"], None
                )
            except HyperfleetError as e:
                if e.status_code != 503:
                    raise
                last = e
                continue
            await self.control.call("add_route", session["id"], agent["id"], user["id"], index)
            return JSONResponse(session, status_code=201, headers=headers)
        assert last is not None
        raise last

    async def get_session(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        route = await self._route(request.path_params["session_id"], user)
        return JSONResponse(
            {"id": route["id"], "agent_id": route["agent_id"], "created_at": route["created_at"]},
            headers=headers,
        )

    async def delete_session(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        route = await self._route(request.path_params["session_id"], user)
        await self.replicas.call(
            route["agent_id"], route["replica"], "close_session", route["id"], user["id"]
        )
        await self.control.call("close_route", route["id"])
        self.gate.forget_routes(session_id=route["id"])
        return JSONResponse({"id": route["id"], "deleted": True}, headers=headers)

    async def transcript(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        route = await self._route(request.path_params["session_id"], user)
        after = _int_param(request, "after", 0, 0, 10**9)
        limit = _int_param(request, "limit", 50, 1, TRANSCRIPT_LIMIT_MAX)
        body = await self.replicas.call(
            route["agent_id"], route["replica"], "transcript", route["id"], user["id"], after, limit
        )
        return JSONResponse(body, headers=headers)

    async def send_message(self, request: Request) -> Response:
        # The hot path: admission, route and reservation in one gate call (no Ray hop with
        # Redis). The replica meters a committed turn and the control store ends its reservation
        # in the same call; the ingress releases only turns that did not commit a new turn.
        session_id = request.path_params["session_id"]
        try:
            message = _validate(MessageIn, await _json_body(request))
            content = message.checked_content()
            key = request.headers.get("idempotency-key")
            if key is not None and not 1 <= len(key) <= 255:
                raise ApiError(
                    400, "invalid_request", "Idempotency-Key must be 1 to 255 characters"
                )
        except ApiError:
            await self._admit(request)  # a bad body still counts against the limits, after auth
            raise
        client = request.client.host if request.client else "unknown"
        begun = await self.gate.begin_message(
            _key_of(request), client, self.ip_per_minute, session_id
        )
        user, headers = self._check_admission(begun["user"], begun["decision"], request)
        route = begun["route"]
        if route is None:
            raise not_found(f"session {session_id}")
        reservation = begun["reservation"]
        args = (route["id"], content, key, user["id"], reservation)
        if message.stream:
            stream = self._stream(route, reservation, args)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        try:
            turn = await self.replicas.call(route["agent_id"], route["replica"], "send", *args)
        except BaseException as e:
            self.gate.release(reservation)
            self._unreachable(e, session_id)
            raise
        if turn.get("replayed"):
            self.gate.release(reservation)
        return JSONResponse(_public_turn(turn), headers=headers)

    async def _stream(
        self, route: dict[str, Any], reservation: Any, args: tuple[Any, ...]
    ) -> AsyncIterator[bytes]:
        committed = False
        try:
            async for event in self.replicas.stream(route["agent_id"], route["replica"], *args):
                if event["type"] == "turn_end" and not event["data"].get("replayed"):
                    committed = True
                yield _sse(event)
        except HyperfleetError as e:
            self._unreachable(e, route["id"])
            error = {"status_code": e.status_code, **e.to_json()}
            yield _sse({"type": "error", "seq": 0, "data": error})
        except GeneratorExit:
            # The client went away; the turn runs on to its commit, which ends the reservation
            # (a turn that then fails holds it until it expires, RESERVATION_TTL_S).
            committed = True
            raise
        finally:
            if not committed:
                self.gate.release(reservation)

    def _unreachable(self, error: BaseException, session_id: str) -> None:
        """A replica that cannot be reached may be a deleted agent's: the session's next request
        reads its route again (and is a 404 if the agent is gone) instead of a cached one."""
        if isinstance(error, ApiError) and error.error_type == "unavailable":
            self.gate.forget_routes(session_id=session_id)

    # Usage ----------------------------------------------------------------------------------

    async def usage(self, request: Request) -> Response:
        user, headers = await self._admit(request)
        rows = await self.control.call("usage", user["id"])
        return JSONResponse({"data": rows}, headers=headers)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(422, "validation_error", f"{name}: must be an integer in [{low}, {high}]")
    return int(raw)


def _public_user(user: dict[str, Any]) -> dict[str, Any]:
    return {k: user[k] for k in ("id", "name", "quotas", "created_at")}


def _public_turn(turn: dict[str, Any]) -> dict[str, Any]:
    keys = ("turn_id", "session_id", "index", "content", "stop_reason", "usage", "cost_usd")
    return {k: turn[k] for k in keys} | {"replayed": bool(turn.get("replayed"))}


def build_app(api: Api) -> Starlette:
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/v1/users", api.create_user, methods=["POST"]),
        Route("/v1/users/{user_id}", api.get_user, methods=["GET"]),
        Route("/v1/users/{user_id}", api.patch_user, methods=["PATCH"]),
        Route("/v1/users/{user_id}/keys", api.create_key, methods=["POST"]),
        Route("/v1/keys/{prefix}", api.revoke_key, methods=["DELETE"]),
        Route("/v1/agents", api.create_agent, methods=["POST"]),
        Route("/v1/agents", api.list_agents, methods=["GET"]),
        Route("/v1/agents/spawn", api.spawn_agent, methods=["POST"]),
        Route("/v1/agents/stats", api.agent_stats, methods=["GET"]),
        Route("/v1/agents/{agent_id}", api.get_agent, methods=["GET"]),
        Route("/v1/agents/{agent_id}", api.delete_agent, methods=["DELETE"]),
        Route("/v1/agents/{agent_id}/sessions", api.create_session, methods=["POST"]),
        Route("/v1/sessions/{session_id}", api.get_session, methods=["GET"]),
        Route("/v1/sessions/{session_id}", api.delete_session, methods=["DELETE"]),
        Route("/v1/sessions/{session_id}/messages", api.transcript, methods=["GET"]),
        Route("/v1/sessions/{session_id}/messages", api.send_message, methods=["POST"]),
        Route("/v1/usage", api.usage, methods=["GET"]),
    ]

    async def on_platform_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HyperfleetError)
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
        exception_handlers={
            HyperfleetError: on_platform_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
