"""The API's Ray edge: the control-store actor and its client, and the agent replicas' handles.

All Ray calls of the HTTP layer are made here. The control store is one detached actor pinned to
the head node; every call to it or to a replica is bounded by a timeout, and a replica that is
restarting answers 503 with ``Retry-After`` instead of hanging the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors import (
    NAMESPACE,
    AgentSpec,
    HyperfleetError,
    RuntimeConfig,
    replica_name,
    spawn_replica,
    start_on_head,
)
from actors.actor import CONTROL_ACTOR_NAME as ACTORS_CONTROL_ACTOR_NAME

from .control import ControlStore
from .errors import ApiError

logger = logging.getLogger(__name__)

CONTROL_ACTOR_NAME = ACTORS_CONTROL_ACTOR_NAME
CONTROL_TIMEOUT_S = 10.0
TURN_CALL_TIMEOUT_S = 3_700.0  # a turn's own wall-clock limit (at most an hour) bounds it first
REPLICA_CALL_TIMEOUT_S = 30.0  # every other replica call: an unplaced replica must not hang us
REPLICA_READY_S = 15.0
RESTARTING_RETRY_S = 2.0
_METHODS = frozenset(
    {
        "create_user",
        "get_user",
        "set_quotas",
        "issue_key",
        "authenticate",
        "admit",
        "begin_message",
        "revoke_key",
        "has_admin",
        "create_agent",
        "get_agent",
        "list_agents",
        "set_agent_status",
        "add_route",
        "get_route",
        "close_route",
        "sessions_per_replica",
        "session_route",
        "reserve",
        "release",
        "record_usages",
        "usage",
    }
)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class ControlStoreActor:
    def __init__(self, path: str, redis_url: str | None = None) -> None:
        mirror = None
        if redis_url is not None:
            # The day's used tokens, for RedisGate's reservations; SQLite stays the record.
            from redis import Redis
            from redis.exceptions import RedisError

            from .admission import DAY_KEY_TTL_S, RedisReservation, used_key

            client = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)

            def mirror(user_id: str, day: str, used: int, reservations: list[Any]) -> None:
                try:
                    with client.pipeline(transaction=True) as pipe:
                        pipe.set(used_key(user_id, day), used, ex=DAY_KEY_TTL_S)
                        for reservation in reservations:
                            if isinstance(reservation, RedisReservation):
                                pipe.zrem(reservation.key, reservation.member)
                        pipe.execute()
                except RedisError:
                    logger.warning("could not mirror %s's usage to Redis", user_id, exc_info=True)

        self._store = ControlStore(Path(path), mirror)

    def call(self, method: str, *args: Any) -> Any:
        if method not in _METHODS:
            raise ValueError(f"no control-store method {method!r}")
        return getattr(self._store, method)(*args)

    def ping(self) -> str:
        return "ok"


def start_control_actor(path: Path, redis_url: str | None = None) -> Any:
    """Starts (or finds) the control-store actor on the head node; returns its handle. With
    ``redis_url`` it mirrors each user's daily usage there (what ``RedisGate`` reads)."""
    return start_on_head(ControlStoreActor, CONTROL_ACTOR_NAME, path, redis_url)


def _cause(error: RayTaskError) -> BaseException:
    """The platform error an actor raised, unwrapped from Ray's task error."""
    cause = error.cause
    return cause if isinstance(cause, HyperfleetError) else error


def _unavailable(what: str, error: Exception) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"{what} is not reachable right now ({type(error).__name__})",
        retry_after_s=RESTARTING_RETRY_S,
    )


class Control:
    """The control store, seen from an ingress replica."""

    def __init__(self) -> None:
        self._handle: Any = None

    async def call(self, method: str, *args: Any) -> Any:
        try:
            if self._handle is None:
                self._handle = ray.get_actor(CONTROL_ACTOR_NAME, namespace=NAMESPACE)
            return await asyncio.wait_for(
                self._handle.call.remote(method, *args), CONTROL_TIMEOUT_S
            )
        except RayTaskError as e:
            raise _cause(e) from None
        except (TimeoutError, GetTimeoutError, RayActorError, ValueError) as e:
            if isinstance(e, ValueError) and "Failed to look up actor" not in str(e):
                raise
            if isinstance(e, RayActorError):
                self._handle = None  # a control store started anew is another actor: look again
            raise _unavailable("the control store", e) from e

    def fire(self, method: str, *args: Any) -> None:
        """Sends a call without waiting for it (bookkeeping off the request's critical path)."""
        if self._handle is None:
            self._handle = ray.get_actor(CONTROL_ACTOR_NAME, namespace=NAMESPACE)
        self._handle.call.remote(method, *args)


class Replicas:
    """Agent replicas by name; handles are cached per ingress replica."""

    def __init__(self, runtime: RuntimeConfig) -> None:
        self.runtime = runtime
        self._handles: dict[str, Any] = {}

    def handle(self, agent_id: str, index: int) -> Any:
        name = replica_name(agent_id, index)
        handle = self._handles.get(name)
        if handle is None:
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError as e:
                raise _unavailable(f"replica {name}", e) from e
            self._handles[name] = handle
        return handle

    async def spawn(self, agent_id: str, spec: AgentSpec, count: int) -> bool:
        """Starts ``count`` replicas; True when all answered a health check in time."""
        handles = [spawn_replica(agent_id, i, spec, self.runtime) for i in range(count)]
        for i, handle in enumerate(handles):
            self._handles[replica_name(agent_id, i)] = handle
        try:
            await asyncio.wait_for(
                asyncio.gather(*(h.health.remote() for h in handles)), REPLICA_READY_S
            )
        except (TimeoutError, GetTimeoutError):
            return False  # placed later, when the cluster has room (the autoscaler adds nodes)
        except (RayActorError, RayTaskError) as e:
            for handle in handles:
                ray.kill(handle, no_restart=True)
            raise ApiError(
                503, "replica_failed", f"the agent's replicas could not start: {e}"[:2000]
            ) from e
        return True

    async def call(self, agent_id: str, index: int, method: str, *args: Any) -> Any:
        handle = self.handle(agent_id, index)
        try:
            timeout_s = TURN_CALL_TIMEOUT_S if method == "send" else REPLICA_CALL_TIMEOUT_S
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)
        except RayTaskError as e:
            raise _cause(e) from None
        except (RayActorError, TimeoutError, GetTimeoutError) as e:
            raise _unavailable(f"replica {replica_name(agent_id, index)}", e) from e

    async def stream(self, agent_id: str, index: int, *args: Any) -> AsyncIterator[dict[str, Any]]:
        handle = self.handle(agent_id, index)
        try:
            async for ref in handle.stream.remote(*args):
                event: dict[str, Any] = await ref
                yield event
        except RayTaskError as e:
            raise _cause(e) from None
        except RayActorError as e:
            raise _unavailable(f"replica {replica_name(agent_id, index)}", e) from e

    async def stats(self, agent_id: str, count: int) -> list[dict[str, Any]]:
        async def one(index: int) -> dict[str, Any]:
            try:
                stats: dict[str, Any] = await asyncio.wait_for(
                    self.handle(agent_id, index).stats.remote(), CONTROL_TIMEOUT_S
                )
                return stats
            except (ApiError, RayActorError, TimeoutError, GetTimeoutError):
                return {"replica": replica_name(agent_id, index), "state": "unavailable"}

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def remove(self, agent_id: str, count: int, drain_s: float) -> None:
        """Drains every replica at once (finishing turns, up to ``drain_s``), removes the
        agent's workspace files on their nodes, then kills them."""

        async def one(index: int) -> None:
            name = replica_name(agent_id, index)
            try:
                handle = self.handle(agent_id, index)
                await asyncio.wait_for(handle.retire.remote(drain_s), drain_s + 5)
            except (ApiError, RayActorError, TimeoutError, GetTimeoutError):
                pass  # already gone or unplaced: nothing to drain
            with contextlib.suppress(ValueError):  # already gone
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            self._handles.pop(name, None)

        await asyncio.gather(*(one(i) for i in range(count)))
