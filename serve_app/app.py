"""The HTTP API: a Starlette app that authenticates, limits, validates and routes to replicas.

Stateless: what must hold across ingress replicas is in the control store (users, keys, agents,
session routes, usage) and in the admission gate's store (rate-limit windows and token
reservations: the control store, or Redis when the deployment has one); replica handles, agent
specs and, with Redis, keys and routes are cached. Every error answer is
``{"error": {"type", "message"}}`` with the right status; another user's agent or session is a
404 on every route, never a 403, so existence is not revealed.

Admission is applied in one place, ``Api.keyed`` and ``Api.turn``, to the routes that
``routes.ROUTES`` (the one route table) says are admitted; it puts the rate-limit headers on every
answer of an admitted request, errors included, and the handlers see only an admitted caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import SecretStr, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from actors import AgentSpec, replica_name
from actors.tools import CustomToolError, check_custom_tools
from autoscaling.pool_config import PoolConfig, complete_spec
from hyperfleet.errors import CapacityError, HyperfleetError, SessionMovedError
from hyperfleet.metering import Reservation, estimate_tokens

from . import live, metrics
from .admission import Gate
from .backend import Control
from .client_address import ClientAddresses
from .errors import ApiError, OverBudgetError, QuotaExceededError, error_response, not_found
from .homes import Homes
from .inputs import int_param, json_body, key_of, peer_of, validate
from .models import MessageIn, Quotas, SpawnRequest, UserCreate, UserPatch
from .readiness import Readiness, ping_session_store
from .records import Admission, Agent, ReplicaRow, Route, User
from .replicas import Message, Pool, Replicas
from .sealing import REDACTED
from .tenancy import TenantPolicy, TenantSpecError, check_not_the_head, check_tenant_spec

logger = logging.getLogger(__name__)

DRAIN_S = 30.0
TRANSCRIPT_LIMIT_MAX = 200
CAPACITY_RETRY_AFTER_S = 5.0
STATS_CONCURRENCY = 16  # agents asked at once for GET /v1/agents/stats


def _with_headers(response: Response, headers: dict[str, str]) -> Response:
    for name, value in headers.items():
        response.headers.setdefault(name, value)
    return response


async def _answer(headers: dict[str, str], answer: Awaitable[Response]) -> Response:
    """An admitted request's answer, or its error's, with the admission's rate-limit headers."""
    try:
        response = await answer
    except HyperfleetError as e:
        metrics.refused(e)
        response = error_response(e)
    return _with_headers(response, headers)


@dataclass(frozen=True)
class Turn:
    """An admitted ``POST /v1/sessions/{id}/messages``: the caller, the session's route, the
    turn's reservation (None without a daily budget) and the validated message."""

    user: User
    route: Route
    reservation: Reservation | None
    content: str | list[dict[str, Any]]
    stream: bool
    idempotency_key: str | None
    if_busy: str = "reject"
    background: bool = False

    @property
    def message(self) -> Message:
        return Message(
            self.content, self.idempotency_key, self.user.id, self.reservation, self.if_busy
        )


class Api:
    def __init__(
        self,
        control: Control,
        replicas: Replicas,
        gate: Gate,
        ip_per_minute: int = 100,
        readiness: Readiness | None = None,
        tenants: TenantPolicy | None = None,
        default_quotas: Quotas | None = None,
        addresses: ClientAddresses | None = None,
        pool: Pool | None = None,
        pool_config: PoolConfig | None = None,
    ) -> None:
        """``readiness`` (default: the control store's and the session store's checks, cached
        for ``readiness.READY_CACHE_S``) answers ``GET /ready``. ``tenants`` is what a user who
        is not an administrator may ask of an agent; ``default_quotas``, what a new user gets
        for the quotas its creator leaves out. ``addresses`` finds a request's client for
        ``ip_per_minute`` (default: the TCP peer, no proxy trusted, none exempt). ``pool`` is
        the pool controller, asked for capacity when an agent's replicas are all full (None:
        none is asked); ``pool_config``, the operator's scaling defaults for new agents."""
        self.control = control
        self.replicas = replicas
        self.gate = gate
        self.ip_per_minute = ip_per_minute
        self.addresses = addresses or ClientAddresses()
        self.tenants = tenants or TenantPolicy()
        self.default_quotas = default_quotas or Quotas()
        self.pool = pool
        self.pool_config = pool_config or PoolConfig()
        self.homes = Homes(control, gate, pool, self.pool_config.capacity_wait_s)
        self._specs: dict[str, AgentSpec] = {}
        self.readiness = readiness or Readiness(
            {"control_store": control.has_admin, "session_store": ping_session_store}
        )

    # Admission: applied to every route (``routes.py`` says which kind) ---------------------

    async def keyed(
        self, request: Request, handler: Callable[[Api, Request, User], Awaitable[Response]]
    ) -> Response:
        """A ``Keyed`` route's answer: admission, then ``handler`` with the caller."""
        user, headers = await self._admit(request)
        return await _answer(headers, handler(self, request, user))

    def _client(self, request: Request) -> tuple[str, int | None]:
        """The request's per-address window and its limit (None: the address is exempt)."""
        key = self.addresses.rate_key(peer_of(request), request.headers)
        return ("exempt", None) if key is None else (key, self.ip_per_minute)

    async def _admit(self, request: Request) -> tuple[User, dict[str, str]]:
        """Rate limits and the key: the caller, and rate-limit headers for the answer."""
        admitted = await self.gate.admit(key_of(request), *self._client(request))
        return self._caller(admitted, request)

    @staticmethod
    def _caller(admitted: Admission, request: Request) -> tuple[User, dict[str, str]]:
        headers = admitted.decision.headers()
        if not admitted.decision.allowed:
            raise ApiError(429, "rate_limited", "too many requests; slow down", headers=headers)
        if admitted.user is None:
            message = "missing API key" if key_of(request) is None else "invalid API key"
            raise ApiError(401, "unauthorized", message, headers=headers)
        return admitted.user, headers

    async def turn(
        self, request: Request, handler: Callable[[Api, Request, Turn], Awaitable[Response]]
    ) -> Response:
        """A ``TurnRoute``'s answer. The body first, so that a bad one reserves nothing; then
        admission, the session's route and the turn's reservation in one gate call (no Ray hop
        with Redis), then ``handler`` with the admitted turn."""
        session_id = request.path_params["session_id"]
        try:
            message = validate(MessageIn, await json_body(request))
            content = message.checked_content()
            key = request.headers.get("idempotency-key")
            if key is not None and not 1 <= len(key) <= 255:
                raise ApiError(
                    400, "invalid_request", "Idempotency-Key must be 1 to 255 characters"
                )
        except ApiError as e:
            # A bad body still counts against the limits, after auth (whose refusal comes first).
            _, headers = await self._admit(request)
            return _with_headers(error_response(e), headers)
        admitted = await self.gate.begin_message(
            key_of(request), *self._client(request), session_id, estimate_tokens(content)
        )
        user, headers = self._caller(admitted, request)

        async def answer() -> Response:
            if admitted.route is None:
                raise not_found(f"session {session_id}")
            if admitted.over_budget is not None:
                raise OverBudgetError(admitted.over_budget)
            turn = Turn(
                user,
                admitted.route,
                admitted.reservation,
                content,
                message.stream,
                key,
                message.if_busy,
                message.background,
            )
            return await handler(self, request, turn)

        return await _answer(headers, answer())

    # Lookups ----------------------------------------------------------------------------------

    @staticmethod
    def _require_admin(user: User) -> None:
        if not user.is_admin:
            raise ApiError(403, "forbidden", "this route is for administrators")

    async def _agent(self, agent_id: str, user: User) -> Agent:
        agent = await self.control.get_agent(agent_id)
        if agent is None or agent.owner != user.id:
            raise not_found(f"agent {agent_id}")
        return agent

    def _spec(self, agent: Agent) -> AgentSpec:
        spec = self._specs.get(agent.id)
        if spec is None:
            spec = AgentSpec.model_validate_json(agent.spec)
            self._specs[agent.id] = spec
        return spec

    async def route_of(self, session_id: str, user: User) -> Route:
        route = await self.control.get_route(session_id)
        if route is None or route.owner != user.id:
            raise not_found(f"session {session_id}")
        return route

    # Ops --------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        checks = await self.readiness.answer()  # at most a second old: no key, no limit
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    # Users and keys -------------------------------------------------------------------------

    async def create_user(self, request: Request, user: User) -> Response:
        self._require_admin(user)
        body = validate(UserCreate, await json_body(request))
        user_id = "usr_" + uuid.uuid4().hex[:16]
        quotas = Quotas.model_validate(
            {**self.default_quotas.model_dump(), **body.quotas.model_dump(exclude_unset=True)}
        )
        created = await self.control.create_user(user_id, body.name, quotas.model_dump())
        key = await self.control.issue_key(user_id)
        out = {
            "id": user_id,
            "name": created.name,
            "api_key": key.api_key,
            "quotas": created.quotas,
        }
        return JSONResponse(out, status_code=201)

    async def _user_for(self, request: Request, caller: User) -> User:
        user_id = request.path_params["user_id"]
        target = await self.control.get_user(user_id)
        if target is None or (not caller.is_admin and caller.id != user_id):
            raise not_found(f"user {user_id}")
        return target

    async def get_user(self, request: Request, user: User) -> Response:
        return JSONResponse((await self._user_for(request, user)).public())

    async def patch_user(self, request: Request, user: User) -> Response:
        target = await self._user_for(request, user)
        self._require_admin(user)
        patch = validate(UserPatch, await json_body(request))
        quotas = Quotas.model_validate(
            {**target.quotas, **patch.quotas.model_dump(exclude_unset=True)}
        )
        updated = await self.control.set_quotas(target.id, quotas.model_dump())
        if updated is None:
            raise not_found(f"user {target.id}")
        self.gate.forget_user(target.id)  # the new quotas apply here at once
        return JSONResponse(updated.public())

    async def create_key(self, request: Request, user: User) -> Response:
        target = await self._user_for(request, user)
        key = await self.control.issue_key(target.id)
        return JSONResponse(asdict(key), status_code=201)

    async def revoke_key(self, request: Request, user: User) -> Response:
        prefix = request.path_params["prefix"]
        requester = None if user.is_admin else user.id
        if not await self.control.revoke_key(prefix, requester):
            raise not_found(f"key {prefix}")
        self.gate.forget_key(prefix)
        return JSONResponse({"prefix": prefix, "revoked": True})

    # Agents ---------------------------------------------------------------------------------

    async def create_agent(self, request: Request, user: User) -> Response:
        spec = validate(AgentSpec, await json_body(request))
        return await self._create_agent(user, spec)

    async def spawn_agent(self, request: Request, user: User) -> Response:
        body = validate(SpawnRequest, await json_body(request))
        try:
            spec = body.to_spec()
        except ValidationError as e:
            raise ApiError(422, "validation_error", str(e.errors()[0]["msg"])) from e
        return await self._create_agent(user, spec)

    async def _create_agent(self, user: User, spec: AgentSpec) -> Response:
        try:
            check_custom_tools(spec.tools, self.replicas.runtime.custom_tools)
        except CustomToolError as e:
            raise ApiError(422, "validation_error", f"tools: {e}") from e
        try:
            spec = complete_spec(spec, self.pool_config)  # stored whole: scaling defaults in
        except ValidationError as e:
            raise ApiError(422, "validation_error", str(e.errors()[0]["msg"])) from e
        except ValueError as e:  # a cooldown under the operator's floor
            raise ApiError(422, "validation_error", str(e)) from e
        if not user.is_admin:  # an administrator's agents are the platform's own
            try:
                check_tenant_spec(spec, self.tenants)
                if spec.label_selector:
                    check_not_the_head(spec.label_selector, await self.replicas.head_labels())
            except TenantSpecError as e:
                raise ApiError(422, "validation_error", str(e)) from e
        agent_id = "agt_" + uuid.uuid4().hex[:16]
        count = max(1, spec.replicas.min)
        spec_json = spec.model_dump_json()
        if spec.anthropic_api_key is not None:  # sealed by the control store, never shown
            data = json.loads(spec_json)
            data["anthropic_api_key"] = spec.anthropic_api_key.get_secret_value()
            spec_json = json.dumps(data)
        await self.control.create_agent(agent_id, user.id, spec_json, count, user.max_agents)
        self._specs[agent_id] = _redacted(spec)  # kept for the agent's answers: no key in it
        try:
            ready = await self.replicas.spawn(agent_id, spec, count)
        except ApiError:
            await self.control.set_agent_status(agent_id, "deleted")
            raise
        status = "ready" if ready else "pending"
        if ready:  # else the pool controller marks each ready when it answers
            for index in range(count):
                await self.control.set_replica_state(agent_id, index, "ready")
        await self.control.set_agent_status(agent_id, status)
        body = {"id": agent_id, "status": status, **spec.public_json(), "replica_count": count}
        return JSONResponse(body, status_code=201)

    async def list_agents(self, request: Request, user: User) -> Response:
        agents = await self.control.list_agents(user.id)
        return JSONResponse({"data": [self._agent_summary(a) for a in agents]})

    def _agent_summary(self, agent: Agent) -> dict[str, Any]:
        return {
            "id": agent.id,
            "status": agent.status,
            "created_at": agent.created_at,
            **self._spec(agent).public_json(),
            "replica_count": agent.replicas,
        }

    async def get_agent(self, request: Request, user: User) -> Response:
        agent = await self._agent(request.path_params["agent_id"], user)
        rows = await self.control.agent_replicas(agent.id)
        pool = await self.control.agent_pool(agent.id)
        replicas = await self._replica_views(agent.id, rows)
        body = self._agent_summary(agent)
        body["replica_bounds"] = body.pop("replicas")
        body["replicas"] = replicas
        body["desired_replicas"] = pool.desired if pool else agent.replicas
        body["scaling_reason"] = pool.reason if pool else None
        body["sessions"] = sum(int(r.get("sessions") or 0) for r in replicas)
        body["capacity"] = sum(
            int(r.get("capacity") or 0) for r in replicas if r["state"] == "ready"
        )
        return JSONResponse(body)

    async def _replica_views(self, agent_id: str, rows: list[ReplicaRow]) -> list[dict[str, Any]]:
        """Each replica's state (``starting``, ``ready``, ``draining``; ``unavailable`` when it
        does not answer) with its node and sessions. A starting replica is not asked: it may
        wait for a node that does not exist yet."""
        placed = [r for r in rows if r.state != "starting"]
        stats = dict(
            zip(
                [r.index for r in placed],
                await self.replicas.stats(agent_id, [r.index for r in placed]),
                strict=True,
            )
        )
        views = []
        for row in rows:
            found = stats.get(row.index, {})
            state = "unavailable" if found.get("state") == "unavailable" else row.state
            views.append(
                {
                    "replica": replica_name(agent_id, row.index),
                    "index": row.index,
                    "state": state,
                    "node_id": found.get("node_id"),
                    "sessions": int(found.get("sessions") or 0),
                    "capacity": int(found.get("capacity") or 0),
                    "since": row.changed_at,
                }
            )
        return views

    async def delete_agent(self, request: Request, user: User) -> Response:
        agent = await self._agent(request.path_params["agent_id"], user)
        await self.control.set_agent_status(agent.id, "draining")
        rows = await self.control.agent_replicas(agent.id)
        # The rows go first: a replica the pool controller is starting now finds none, and
        # stops itself instead of turning ready.
        await self.control.drop_pool(agent.id)
        await self.replicas.remove(agent.id, [r.index for r in rows], DRAIN_S)
        await self.control.set_agent_status(agent.id, "deleted")
        self._specs.pop(agent.id, None)
        self.gate.forget_routes(agent_id=agent.id)
        return JSONResponse({"id": agent.id, "status": "deleted"})

    async def agent_stats(self, request: Request, user: User) -> Response:
        agents = await self.control.list_agents(user.id)
        limit = asyncio.Semaphore(STATS_CONCURRENCY)

        async def one(agent: Agent) -> tuple[int, list[dict[str, Any]]]:
            async with limit:
                pool = await self.control.agent_pool(agent.id)
                rows = await self.control.agent_replicas(agent.id)
                views = await self._replica_views(agent.id, rows)
                return (pool.desired if pool else agent.replicas), views

        per_node: dict[str, int] = {}
        by_state = {"starting": 0, "ready": 0, "draining": 0, "unavailable": 0}
        desired = active = capacity = 0
        for wanted, views in await asyncio.gather(*(one(a) for a in agents)):
            desired += wanted
            for view in views:
                by_state[view["state"]] = by_state.get(view["state"], 0) + 1
                active += view["sessions"]
                if view["state"] == "ready":
                    capacity += view["capacity"]
                node = view["node_id"] or "unplaced"
                per_node[node] = per_node.get(node, 0) + 1
        body = {
            "agents": len(agents),
            "replicas": sum(by_state.values()),
            "desired_replicas": desired,
            "replicas_by_state": by_state,
            "sessions": {"active": active, "capacity": capacity},
            "per_node": per_node,
        }
        return JSONResponse(body)

    # Sessions -------------------------------------------------------------------------------

    async def create_session(self, request: Request, user: User) -> Response:
        """Opens a session on the least-loaded ready replica with room. When every one is full
        (or there is none: a pool scaled to zero), the pool controller is asked for capacity and
        the open waits for it (``PoolConfig.capacity_wait_s``); only then may a full replica
        evict an idle session to take the new one."""
        agent = await self._agent(request.path_params["agent_id"], user)
        last: HyperfleetError | None = None
        for attempt in range(2):
            # The second pass may evict an idle session from a full replica: the pool could
            # not grow in time (at its max, or the cluster has no room yet).
            claimed = True  # placement claimed the first replica it lists for this open
            for index, _ in await self.control.placement(agent.id, claim=True):
                try:
                    session = await self.replicas.open_session(
                        agent.id, index, user.id, evict=attempt == 1
                    )
                except HyperfleetError as e:
                    if claimed:
                        claimed = False
                        with contextlib.suppress(HyperfleetError):
                            await self.control.release_claim(agent.id, index)
                    if e.status_code != 503:
                        raise
                    last = e
                    continue
                await self._add_route(session, agent.id, user.id, index)
                return JSONResponse(session, status_code=201)
            if attempt == 0 and self.pool is not None:
                await self.pool.request_capacity(agent.id, self.pool_config.capacity_wait_s)
        if last is not None:
            raise last
        raise CapacityError(
            "no replica of this agent can take a session now; it is scaling up",
            retry_after_s=CAPACITY_RETRY_AFTER_S,
        )

    async def _add_route(
        self, session: dict[str, Any], agent_id: str, owner: str, index: int
    ) -> None:
        try:
            await self.control.add_route(session["id"], agent_id, owner, index)
        except QuotaExceededError:
            # Over max_sessions (checked with the insert, so concurrent opens cannot both pass):
            # the session just opened is closed again, and the answer is a 403.
            opened = Route(session["id"], agent_id, owner, index, 0.0, 0)
            with contextlib.suppress(HyperfleetError):
                await self.replicas.close_session(opened, owner)
            raise

    async def get_session(self, request: Request, user: User) -> Response:
        route = await self.route_of(request.path_params["session_id"], user)
        return JSONResponse(
            {"id": route.id, "agent_id": route.agent_id, "created_at": route.created_at}
        )

    async def delete_session(self, request: Request, user: User) -> Response:
        route = await self.route_of(request.path_params["session_id"], user)
        await self.homes.at_home(route, lambda r: self.replicas.close_session(r, user.id))
        await self.control.close_route(route.id)
        self.gate.forget_routes(session_id=route.id)
        return JSONResponse({"id": route.id, "deleted": True})

    async def transcript(self, request: Request, user: User) -> Response:
        route = await self.route_of(request.path_params["session_id"], user)
        after = int_param(request, "after", 0, 0, 10**9)
        limit = int_param(request, "limit", 50, 1, TRANSCRIPT_LIMIT_MAX)
        page = await self.homes.at_home(
            route, lambda r: self.replicas.transcript(r, user.id, after, limit)
        )
        return JSONResponse(page)

    async def send_message(self, request: Request, turn: Turn) -> Response:
        # From the call on, the replica owns the turn's reservation: it meters every model call
        # and ends the reservation however the turn ends (``hyperfleet.metering``). The ingress
        # ends it only when no replica took the turn (none found; every one draining), and
        # never because its client went away.
        turn = await self._reach(turn)
        if turn.stream:
            return live.stream_turn(self, turn)
        run = self.replicas.start_turn if turn.background else self.replicas.send
        try:
            answer = await self.homes.at_home(turn.route, lambda route: run(route, turn.message))
        except HyperfleetError as e:
            if isinstance(e, SessionMovedError):
                self.gate.release(turn.reservation)
            self.forget_unreachable(e, turn.route.id)
            raise
        if turn.background:  # ``{turn_id, session_id, status}``: it runs on, unattended
            return JSONResponse(answer, status_code=202)
        return JSONResponse(live.public_turn(answer))

    async def _reach(self, turn: Turn) -> Turn:
        """Finds the session's replica (following the session if its replica was scaled
        down); one that cannot be found ran nothing, so the turn's reservation ends here."""
        try:
            self.replicas.handle(turn.route.agent_id, turn.route.replica)
            return turn
        except HyperfleetError as e:
            moved = await self.homes.follow(turn.route, e)
            if moved is not None:
                return replace(turn, route=moved)
            self.gate.release(turn.reservation)
            self.forget_unreachable(e, turn.route.id)
            raise

    def forget_unreachable(self, error: BaseException, session_id: str) -> None:
        """A replica that cannot be reached may be a deleted agent's: the session's next request
        reads its route again (and is a 404 if the agent is gone) instead of a cached one."""
        if isinstance(error, ApiError) and error.error_type == "unavailable":
            self.gate.forget_routes(session_id=session_id)

    # Usage ----------------------------------------------------------------------------------

    async def usage(self, request: Request, user: User) -> Response:
        rows = await self.control.usage(user.id)
        return JSONResponse({"data": [asdict(row) for row in rows]})


def _redacted(spec: AgentSpec) -> AgentSpec:
    """``spec`` as the control store hands it out (``sealing.REDACTED`` for its own key)."""
    if spec.anthropic_api_key is None:
        return spec
    return spec.model_copy(update={"anthropic_api_key": SecretStr(REDACTED)})
