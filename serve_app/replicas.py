"""The agent replicas' handles and the pool controller's, seen from the HTTP layer.

All Ray calls the API makes to agent replicas are made here (``backend.py`` has the control
store's). Every call to a replica is bounded by a timeout; a replica that cannot be reached is a
503 (``unavailable``) that the API may answer by following its session to another replica
(``app.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from actors import AgentSpec, RuntimeConfig, replica_name, spawn_replica
from hyperfleet import logs
from hyperfleet.metering import Reservation
from hyperfleet.names import NAMESPACE, POOL_ACTOR_NAME

from . import metrics
from .backend import CONTROL_TIMEOUT_S, HEAD_RESOURCE, cause_of
from .errors import REPLICA_DIED_RETRY_S, RESTARTING_RETRY_S, ApiError, unavailable
from .records import Route

logger = logging.getLogger(__name__)

# A turn's own wall-clock limit (at most an hour) and, queued behind others (``if_busy:
# "enqueue"``), its wait for its place (at most an hour, ``actors.turns.QUEUE_WAIT_MAX_S``) bound
# it first.
TURN_CALL_TIMEOUT_S = 7_300.0
REPLICA_CALL_TIMEOUT_S = 30.0  # every other replica call: an unplaced replica must not hang us
REPLICA_READY_S = 15.0


async def _answer(ref: Any) -> Any:
    """Awaits an object ref as a coroutine (so that a task can wrap it)."""
    return await ref


@dataclass(frozen=True)
class Message:
    """A message for a replica: what ``send``, ``stream`` and ``start`` take."""

    content: str | list[dict[str, Any]]
    idempotency_key: str | None
    owner: str
    reservation: Reservation | None
    if_busy: str = "reject"

    def args(self, route: Route) -> tuple[Any, ...]:
        """The replica method's arguments, with the request's trace (``hyperfleet.logs``)."""
        trace = dict(logs.current())
        return (
            route.id,
            self.content,
            self.idempotency_key,
            self.owner,
            self.reservation,
            trace,
            self.if_busy,
        )


class Replicas:
    """Agent replicas by name; handles are cached per ingress replica."""

    def __init__(self, runtime: RuntimeConfig) -> None:
        self.runtime = runtime
        self._handles: dict[str, Any] = {}
        self._head_labels: dict[str, str] | None = None

    async def head_labels(self) -> dict[str, str]:
        """The head node's labels, from Ray's node table (read once per ingress replica: the
        head of a running cluster does not change); a tenant may not select them."""
        if self._head_labels is None:
            try:
                nodes = await asyncio.wait_for(asyncio.to_thread(ray.nodes), CONTROL_TIMEOUT_S)
            except (TimeoutError, ConnectionError, RuntimeError) as e:
                raise unavailable("the cluster's node table", e) from e
            heads = [n for n in nodes if HEAD_RESOURCE in (n.get("Resources") or {})]
            self._head_labels = {
                str(k): str(v) for head in heads for k, v in (head.get("Labels") or {}).items()
            }
        return dict(self._head_labels)

    def handle(self, agent_id: str, index: int) -> Any:
        name = replica_name(agent_id, index)
        handle = self._handles.get(name)
        if handle is None:
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError as e:
                raise unavailable(f"replica {name}", e) from e
            self._handles[name] = handle
        return handle

    async def spawn(self, agent_id: str, spec: AgentSpec, count: int) -> bool:
        """Starts ``count`` replicas; True when all answered a health check in time."""
        started = time.monotonic()
        handles = [spawn_replica(agent_id, i, spec, self.runtime) for i in range(count)]
        for i, handle in enumerate(handles):
            self._handles[replica_name(agent_id, i)] = handle
        checks = [asyncio.ensure_future(_answer(h.health.remote())) for h in handles]
        try:
            await asyncio.wait_for(asyncio.gather(*checks), REPLICA_READY_S)
        except (TimeoutError, GetTimeoutError):
            # Placed later, when the cluster has room (the autoscaler adds nodes).
            metrics.agent_spawned("pending", sum(c.cancelled() for c in checks))
            return False
        except (RayActorError, RayTaskError) as e:
            metrics.agent_spawned("failed", count)
            for handle in handles:
                ray.kill(handle, no_restart=True)
            raise ApiError(
                503, "replica_failed", f"the agent's replicas could not start: {e}"[:2000]
            ) from e
        metrics.agent_spawned("ready", count, time.monotonic() - started)
        return True

    async def _call(
        self, agent_id: str, index: int, method: str, timeout_s: float, *args: Any
    ) -> Any:
        handle = self.handle(agent_id, index)
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)
        except RayTaskError as e:
            raise cause_of(e) from None
        except (RayActorError, TimeoutError, GetTimeoutError) as e:
            if isinstance(e, RayActorError):  # gone (scaled down), or restarting: look again
                self._handles.pop(replica_name(agent_id, index), None)
            raise unavailable(f"replica {replica_name(agent_id, index)}", e, _retry_s(e)) from e

    async def open_session(
        self, agent_id: str, index: int, owner: str, evict: bool = True
    ) -> dict[str, Any]:
        session: dict[str, Any] = await self._call(
            agent_id, index, "open_session", REPLICA_CALL_TIMEOUT_S, owner, None, evict
        )
        return session

    async def send(self, route: Route, message: Message) -> dict[str, Any]:
        """Runs a turn on the session's replica, which from the call on owns its reservation; the
        request's trace (``hyperfleet.logs``) goes with it."""
        turn: dict[str, Any] = await self._call(
            route.agent_id, route.replica, "send", TURN_CALL_TIMEOUT_S, *message.args(route)
        )
        return turn

    async def start_turn(self, route: Route, message: Message) -> dict[str, Any]:
        """Starts a background turn; the replica answers once the turn has its place."""
        accepted: dict[str, Any] = await self._call(
            route.agent_id, route.replica, "start", REPLICA_CALL_TIMEOUT_S, *message.args(route)
        )
        return accepted

    async def stream(self, route: Route, message: Message) -> AsyncIterator[dict[str, Any]]:
        """A turn's events, as the replica yields them (``send``, streamed)."""
        handle = self.handle(route.agent_id, route.replica)
        async for event in self._streamed(route, handle.stream.remote(*message.args(route))):
            yield event

    async def events(self, route: Route, owner: str, after: int) -> AsyncIterator[dict[str, Any]]:
        """The session's events after id ``after``, then live while a turn runs."""
        handle = self.handle(route.agent_id, route.replica)
        async for event in self._streamed(route, handle.events.remote(route.id, owner, after)):
            yield event

    async def _streamed(self, route: Route, stream: Any) -> AsyncIterator[dict[str, Any]]:
        try:
            async for ref in stream:
                event: dict[str, Any] = await ref
                yield event
        except RayTaskError as e:
            raise cause_of(e) from None
        except RayActorError as e:
            name = replica_name(route.agent_id, route.replica)
            raise unavailable(f"replica {name}", e, _retry_s(e)) from e

    async def turn_status(self, route: Route, turn_id: str, owner: str) -> dict[str, Any]:
        status: dict[str, Any] = await self._call(
            route.agent_id,
            route.replica,
            "turn_status",
            REPLICA_CALL_TIMEOUT_S,
            route.id,
            turn_id,
            owner,
        )
        return status

    async def transcript(self, route: Route, owner: str, after: int, limit: int) -> dict[str, Any]:
        page: dict[str, Any] = await self._call(
            route.agent_id,
            route.replica,
            "transcript",
            REPLICA_CALL_TIMEOUT_S,
            route.id,
            owner,
            after,
            limit,
        )
        return page

    async def close_session(self, route: Route, owner: str) -> None:
        await self._call(
            route.agent_id, route.replica, "close_session", REPLICA_CALL_TIMEOUT_S, route.id, owner
        )

    async def stats(
        self, agent_id: str, indices: list[int], timeout_s: float = CONTROL_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """Each replica's ``stats``; one that does not answer within ``timeout_s`` is
        ``unavailable``."""

        async def one(index: int) -> dict[str, Any]:
            try:
                stats: dict[str, Any] = await asyncio.wait_for(
                    self.handle(agent_id, index).stats.remote(), timeout_s
                )
                return stats
            except (ApiError, RayActorError, TimeoutError, GetTimeoutError):
                return {"replica": replica_name(agent_id, index), "state": "unavailable"}

        return list(await asyncio.gather(*(one(i) for i in indices)))

    def start(self, agent_id: str, index: int, spec: AgentSpec) -> Any:
        """Starts replica ``index`` (or finds it running); returns its handle at once: Ray places
        it when a node has room, and until then it is demand for the autoscaler."""
        handle = spawn_replica(agent_id, index, spec, self.runtime)
        self._handles[replica_name(agent_id, index)] = handle
        return handle

    async def drain(self, agent_id: str, index: int, deadline_s: float) -> list[str]:
        """Drains one replica (``AgentActor.drain``): it takes no new turn, finishes those
        running (up to ``deadline_s``) and hands its sessions back to the store."""
        handed: list[str] = await self._call(agent_id, index, "drain", deadline_s + 10, deadline_s)
        return handed

    def kill(self, agent_id: str, index: int, restart: bool = False) -> bool:
        """Stops a replica for good (Ray does not restart it), or with ``restart`` ends its
        process for Ray to start again under the same name; False when there was no such
        actor (already gone, which is fine)."""
        name = replica_name(agent_id, index)
        self._handles.pop(name, None)
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=not restart)
        except ValueError:
            return False
        return True

    async def remove(self, agent_id: str, indices: list[int], drain_s: float) -> None:
        """Drains every replica at once (finishing turns, up to ``drain_s``), removes the
        agent's workspace files on their nodes, then kills them."""

        async def one(index: int) -> None:
            try:
                handle = self.handle(agent_id, index)
                await asyncio.wait_for(handle.retire.remote(drain_s), drain_s + 5)
            except (ApiError, RayActorError, TimeoutError, GetTimeoutError):
                pass  # already gone or unplaced: nothing to drain
            self.kill(agent_id, index)

        await asyncio.gather(*(one(i) for i in indices))


class Pool:
    """The pool controller (``autoscaling/pool.py``), seen from an ingress replica: asked for
    capacity when a session open finds every replica of an agent full. A controller that cannot
    be reached answers "no capacity", never an error of its own."""

    def __init__(self, name: str = POOL_ACTOR_NAME) -> None:
        self._name = name
        self._handle: Any = None

    async def request_capacity(self, agent_id: str, wait_s: float) -> bool:
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self._name, namespace=NAMESPACE)
            grew: bool = await asyncio.wait_for(
                self._handle.request_capacity.remote(agent_id, wait_s),
                wait_s + CONTROL_TIMEOUT_S,
            )
            return grew
        except (RayActorError, RayTaskError, TimeoutError, GetTimeoutError, ValueError) as e:
            self._handle = None
            logger.warning("the pool controller did not answer for %s: %r", agent_id, e)
            return False


def _retry_s(error: BaseException) -> float:
    """How soon a resend may reach the replica: a process that died restarts in about a second
    (``ActorDiedError``); one Ray cannot reach (its node lost or cut off, which Ray takes many
    seconds to decide) or a call that timed out, later."""
    return REPLICA_DIED_RETRY_S if isinstance(error, ActorDiedError) else RESTARTING_RETRY_S
