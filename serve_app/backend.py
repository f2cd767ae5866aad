"""The API's Ray edge to the control store: the control-store actor and its client.

All Ray calls of the HTTP layer to the control store are made here (``replicas.py`` has those to
the agent replicas and the pool controller). The control store is one detached actor pinned to
the head node, a thin shell over ``ControlStore`` with one typed method per store method (as
``actors.store.actor.SessionStoreActor`` is over the session store); ``Control`` is its typed
client in an ingress replica. Every call to it or to a replica is bounded by a timeout, and a
backend that is restarting answers 503 with ``Retry-After`` instead of hanging the request.

Agent replicas load this module too (Ray imports an actor's class where its handle is used, and
they meter their turns into the control store), so it imports neither Ray Serve nor the web app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors import start_on_head
from hyperfleet import logs
from hyperfleet.errors import HyperfleetError
from hyperfleet.metering import Charge, Reservation, UsageRecord
from hyperfleet.names import CONTROL_ACTOR_NAME, NAMESPACE

from .control import ControlStore
from .errors import unavailable
from .records import (
    Admission,
    Agent,
    IssuedKey,
    PoolAgent,
    PoolRow,
    ReplicaRow,
    Route,
    UsageRow,
    User,
)

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0
HEAD_RESOURCE = "node:__internal_head__"  # what Ray's node table gives the head node alone

# The control store is a detached actor that outlives a code upgrade; its methods changed in
# 2026-12 (from one string-dispatched ``call``; 3: ``charge``, and usage records' ``turns``; An
# ingress or a stack that finds an actor with another protocol refuses it with a message rather
# than failing every call.
# 4: agent pools (replica rows, placement, moving routes); 5: placement claims
CONTROL_PROTOCOL = 5
CONTROL_START_TIMEOUT_S = 60.0  # a new actor's first answer: its process starts first


class ControlStoreMismatch(HyperfleetError):
    """The running control-store actor speaks another protocol (an older Hyperfleet started
    it): stop the stack or the actor, and start it again."""

    status_code = 503
    error_type = "control_store_mismatch"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class ControlStoreActor:
    """``ControlStore`` in one actor. Its methods are plain (not async), so Ray runs one call at a
    time: that is what makes quota checks atomic across ingress replicas."""

    def __init__(self, path: str, redis_url: str | None = None) -> None:
        logs.configure("control-store")
        mirror = None
        if redis_url is not None:
            # Imported here: replicas load this class and have no use for a Redis client.
            from .redis_budget import RedisUsageMirror

            mirror = RedisUsageMirror(redis_url)
        self._store = ControlStore(Path(path), mirror)

    def ping(self) -> str:
        return "ok"

    def protocol(self) -> int:
        return CONTROL_PROTOCOL

    def create_user(
        self, user_id: str, name: str, quotas: Mapping[str, Any], is_admin: bool = False
    ) -> User:
        return self._store.create_user(user_id, name, quotas, is_admin)

    def get_user(self, user_id: str) -> User | None:
        return self._store.get_user(user_id)

    def set_quotas(self, user_id: str, quotas: Mapping[str, Any]) -> User | None:
        return self._store.set_quotas(user_id, quotas)

    def issue_key(self, user_id: str) -> IssuedKey:
        return self._store.issue_key(user_id)

    def authenticate(self, api_key: str) -> User | None:
        return self._store.authenticate(api_key)

    def admit(self, api_key: str | None, client_ip: str, ip_per_minute: int | None) -> Admission:
        return self._store.admit(api_key, client_ip, ip_per_minute)

    def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission:
        return self._store.begin_message(
            api_key, client_ip, ip_per_minute, session_id, input_tokens
        )

    def revoke_key(self, prefix: str, requester: str | None) -> bool:
        return self._store.revoke_key(prefix, requester)

    def has_admin(self) -> bool:
        return self._store.has_admin()

    def create_agent(
        self, agent_id: str, owner: str, spec_json: str, replicas: int, max_agents: int
    ) -> Agent:
        return self._store.create_agent(agent_id, owner, spec_json, replicas, max_agents)

    def get_agent(self, agent_id: str) -> Agent | None:
        return self._store.get_agent(agent_id)

    def list_agents(self, owner: str | None) -> list[Agent]:
        return self._store.list_agents(owner)

    def set_agent_status(self, agent_id: str, status: str) -> None:
        self._store.set_agent_status(agent_id, status)

    def add_route(self, session_id: str, agent_id: str, owner: str, replica: int) -> None:
        self._store.add_route(session_id, agent_id, owner, replica)

    def get_route(self, session_id: str) -> Route | None:
        return self._store.get_route(session_id)

    def close_route(self, session_id: str) -> None:
        self._store.close_route(session_id)

    def pool_agents(self) -> list[PoolAgent]:
        return self._store.pools.agents()

    def pool_agent(self, agent_id: str) -> PoolAgent | None:
        return self._store.pools.agent(agent_id)

    def agent_replicas(self, agent_id: str) -> list[ReplicaRow]:
        return self._store.pools.replicas(agent_id)

    def agent_pool(self, agent_id: str) -> PoolRow | None:
        return self._store.pools.pool(agent_id)

    def add_replicas(self, agent_id: str, count: int, fleet_max: int) -> list[int]:
        return self._store.pools.allocate(agent_id, count, fleet_max)

    def set_replica_state(
        self, agent_id: str, index: int, state: str, deadline: float | None = None
    ) -> bool:
        return self._store.pools.set_state(agent_id, index, state, deadline)

    def remove_replica(self, agent_id: str, index: int, only_state: str | None = None) -> bool:
        return self._store.pools.remove(agent_id, index, only_state)

    def replica_spec(self, agent_id: str) -> str | None:
        return self._store.replica_spec(agent_id)

    def drop_pool(self, agent_id: str) -> None:
        self._store.pools.drop(agent_id)

    def record_pool(self, agent_id: str, desired: int, reason: str, state_json: str) -> None:
        self._store.pools.record(agent_id, desired, reason, state_json)

    def placement(self, agent_id: str, claim: bool = False) -> list[tuple[int, int]]:
        return self._store.pools.placement(agent_id, claim)

    def release_claim(self, agent_id: str, index: int) -> None:
        self._store.pools.settle(agent_id, index)

    def rehome(self, session_id: str, source: int) -> Route | None:
        return self._store.rehome(session_id, source)

    def rehome_all(self, agent_id: str, source: int) -> int:
        return self._store.pools.move_off(agent_id, source, None)

    def release(self, reservation: Reservation) -> None:
        self._store.release(reservation)

    def record_usages(self, records: list[UsageRecord]) -> int:
        return self._store.record_usages(records)

    def charge(self, record: UsageRecord, reservation: Reservation, next_tokens: int) -> Charge:
        return self._store.charge(record, reservation, next_tokens)

    def usage(self, user_id: str) -> list[UsageRow]:
        return self._store.usage(user_id)


def start_control_actor(
    path: Path, redis_url: str | None = None, name: str = CONTROL_ACTOR_NAME
) -> Any:
    """Starts (or finds) the control-store actor on the head node; returns its handle. With
    ``redis_url`` it mirrors each user's daily usage there (what ``RedisGate`` reads).

    Raises:
        ControlStoreMismatch: the actor found speaks another protocol.
    """
    handle = start_on_head(ControlStoreActor, name, path, redis_url)
    found = None
    if hasattr(handle, "protocol"):  # an actor from before CONTROL_PROTOCOL has no such method
        found = ray.get(handle.protocol.remote(), timeout=CONTROL_START_TIMEOUT_S)
    if found != CONTROL_PROTOCOL:
        raise ControlStoreMismatch(
            f"the running control store (actor {name!r}, namespace {NAMESPACE!r}) "
            f"speaks protocol {found or 1}, this Hyperfleet {CONTROL_PROTOCOL}: an older "
            "Hyperfleet started it. Stop it (hyperfleet down) and start again."
        )
    return handle


def cause_of(error: RayTaskError) -> BaseException:
    """The platform error an actor raised, unwrapped from Ray's task error."""
    cause = error.cause
    return cause if isinstance(cause, HyperfleetError) else error


class Control:
    """The control store, seen from an ingress replica: each method is one call to the actor,
    bounded by ``timeout_s``. A store that cannot be reached, or does not answer in time, is a
    503 (``ApiError``) to retry; an error the store raised (a quota) is raised as itself."""

    def __init__(
        self, timeout_s: float = CONTROL_TIMEOUT_S, name: str = CONTROL_ACTOR_NAME
    ) -> None:
        self._timeout_s = timeout_s
        self._name = name
        self._handle: Any = None

    def _actor(self) -> Any:
        if self._handle is None:
            self._handle = ray.get_actor(self._name, namespace=NAMESPACE)
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(
                getattr(self._actor(), method).remote(*args), self._timeout_s
            )
        except AttributeError as e:  # an actor an older Hyperfleet started: no such method
            raise unavailable("the control store (it runs another Hyperfleet version)", e) from e
        except RayTaskError as e:
            raise cause_of(e) from None
        except (TimeoutError, GetTimeoutError, RayActorError, ValueError) as e:
            if isinstance(e, ValueError) and "Failed to look up actor" not in str(e):
                raise
            if isinstance(e, RayActorError):
                self._handle = None  # a control store started anew is another actor: look again
            raise unavailable("the control store", e) from e

    async def ping(self) -> None:
        await self._call("ping")

    async def create_user(
        self, user_id: str, name: str, quotas: Mapping[str, Any], is_admin: bool = False
    ) -> User:
        user: User = await self._call("create_user", user_id, name, dict(quotas), is_admin)
        return user

    async def get_user(self, user_id: str) -> User | None:
        user: User | None = await self._call("get_user", user_id)
        return user

    async def set_quotas(self, user_id: str, quotas: Mapping[str, Any]) -> User | None:
        user: User | None = await self._call("set_quotas", user_id, dict(quotas))
        return user

    async def issue_key(self, user_id: str) -> IssuedKey:
        key: IssuedKey = await self._call("issue_key", user_id)
        return key

    async def authenticate(self, api_key: str) -> User | None:
        user: User | None = await self._call("authenticate", api_key)
        return user

    async def admit(
        self, api_key: str | None, client_ip: str, ip_per_minute: int | None
    ) -> Admission:
        admitted: Admission = await self._call("admit", api_key, client_ip, ip_per_minute)
        return admitted

    async def begin_message(
        self,
        api_key: str | None,
        client_ip: str,
        ip_per_minute: int | None,
        session_id: str,
        input_tokens: int = 0,
    ) -> Admission:
        admitted: Admission = await self._call(
            "begin_message", api_key, client_ip, ip_per_minute, session_id, input_tokens
        )
        return admitted

    async def revoke_key(self, prefix: str, requester: str | None) -> bool:
        revoked: bool = await self._call("revoke_key", prefix, requester)
        return revoked

    async def has_admin(self) -> bool:
        has: bool = await self._call("has_admin")
        return has

    async def create_agent(
        self, agent_id: str, owner: str, spec_json: str, replicas: int, max_agents: int
    ) -> Agent:
        agent: Agent = await self._call(
            "create_agent", agent_id, owner, spec_json, replicas, max_agents
        )
        return agent

    async def get_agent(self, agent_id: str) -> Agent | None:
        agent: Agent | None = await self._call("get_agent", agent_id)
        return agent

    async def list_agents(self, owner: str | None) -> list[Agent]:
        agents: list[Agent] = await self._call("list_agents", owner)
        return agents

    async def set_agent_status(self, agent_id: str, status: str) -> None:
        await self._call("set_agent_status", agent_id, status)

    async def add_route(self, session_id: str, agent_id: str, owner: str, replica: int) -> None:
        await self._call("add_route", session_id, agent_id, owner, replica)

    async def get_route(self, session_id: str) -> Route | None:
        route: Route | None = await self._call("get_route", session_id)
        return route

    async def close_route(self, session_id: str) -> None:
        await self._call("close_route", session_id)

    async def pool_agents(self) -> list[PoolAgent]:
        agents: list[PoolAgent] = await self._call("pool_agents")
        return agents

    async def pool_agent(self, agent_id: str) -> PoolAgent | None:
        agent: PoolAgent | None = await self._call("pool_agent", agent_id)
        return agent

    async def agent_replicas(self, agent_id: str) -> list[ReplicaRow]:
        rows: list[ReplicaRow] = await self._call("agent_replicas", agent_id)
        return rows

    async def agent_pool(self, agent_id: str) -> PoolRow | None:
        pool: PoolRow | None = await self._call("agent_pool", agent_id)
        return pool

    async def add_replicas(self, agent_id: str, count: int, fleet_max: int) -> list[int]:
        indices: list[int] = await self._call("add_replicas", agent_id, count, fleet_max)
        return indices

    async def set_replica_state(
        self, agent_id: str, index: int, state: str, deadline: float | None = None
    ) -> bool:
        found: bool = await self._call("set_replica_state", agent_id, index, state, deadline)
        return found

    async def remove_replica(
        self, agent_id: str, index: int, only_state: str | None = None
    ) -> bool:
        removed: bool = await self._call("remove_replica", agent_id, index, only_state)
        return removed

    async def replica_spec(self, agent_id: str) -> str | None:
        """The agent's spec with its own Anthropic key opened: for starting a replica only."""
        spec: str | None = await self._call("replica_spec", agent_id)
        return spec

    async def drop_pool(self, agent_id: str) -> None:
        await self._call("drop_pool", agent_id)

    async def record_pool(self, agent_id: str, desired: int, reason: str, state_json: str) -> None:
        await self._call("record_pool", agent_id, desired, reason, state_json)

    async def placement(self, agent_id: str, claim: bool = False) -> list[tuple[int, int]]:
        """The agent's ready replicas, least loaded first; ``claim`` (a session open) claims
        a slot on the first until the open records its route (``PoolTable.placement``)."""
        ready: list[tuple[int, int]] = await self._call("placement", agent_id, claim)
        return ready

    async def release_claim(self, agent_id: str, index: int) -> None:
        """A session open's claimed replica refused it: the claim ends now, not in 30 s."""
        await self._call("release_claim", agent_id, index)

    async def rehome(self, session_id: str, source: int) -> Route | None:
        route: Route | None = await self._call("rehome", session_id, source)
        return route

    async def rehome_all(self, agent_id: str, source: int) -> int:
        moved: int = await self._call("rehome_all", agent_id, source)
        return moved

    async def usage(self, user_id: str) -> list[UsageRow]:
        rows: list[UsageRow] = await self._call("usage", user_id)
        return rows

    def release_soon(self, reservation: Reservation) -> None:
        """Ends a reservation without waiting (bookkeeping off the request's critical path). Ray
        runs one caller's calls to an actor in order, so this caller's next call sees it done."""
        self._actor().release.remote(reservation)
