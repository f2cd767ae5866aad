"""``AgentActor``: the Ray shell around ``SessionHost``. All Ray calls of the runtime live here.

``build_host`` wires a replica's ``SessionHost`` (tools, loop, breaker, store, workspaces) as plain
Python; the actor calls it, and the tests that run a host without Ray call it too.

A replica is an async actor, detached, named ``agent-<agent_id>-<n>`` in namespace ``hyperfleet``,
restarted by Ray when its process dies (``max_restarts=-1``). A restart re-runs ``__init__``: the
sessions it hosted reload from the store on their next access, and a turn that was running is
simply absent (it was never committed) and can be sent again. Methods are not retried by Ray
(``max_task_retries=0``): a resend is the caller's decision, made safe by idempotency keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from hyperfleet import logs
from hyperfleet.errors import HyperfleetError, InvalidRequestError
from hyperfleet.metering import Charge, Reservation, UsageRecord
from hyperfleet.names import CONTROL_ACTOR_NAME
from hyperfleet.names import NAMESPACE as NAMESPACE  # re-exported: actors.NAMESPACE

from . import metrics
from .breaker import BREAKERS, CircuitBreaker
from .host import SessionHost
from .loop import STREAM_BACKOFF_S, AgentLoop, LoopConfig
from .meter import ControlUnavailable, Metering, OutboxMetering, UsageRefused
from .model_client import PendingClient
from .spec import AgentSpec, placement_options
from .store import SessionStore, open_store
from .store.metered import MeteredStore
from .tools import EgressFirewall, EgressUnavailable, Sandbox, SandboxLimits, build_tools
from .tools.workspace import MIB
from .turns import IF_BUSY, IfBusy

if TYPE_CHECKING:
    import anthropic

METER_CALL_TIMEOUT_S = 30.0
METER_FLUSH_S = 10.0
logger = logging.getLogger(__name__)


class RuntimeConfig(BaseModel):
    """What a replica needs from the platform: where the model API and the store are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    anthropic_base_url: str | None = None
    anthropic_api_key: SecretStr | None = Field(
        default=None, description="default: ANTHROPIC_API_KEY in the replica's environment"
    )
    store_url: str = "ray://session-store"
    workspaces: str | None = Field(
        default=None, description="default: /var/lib/hyperfleet/workspaces as root, else ~"
    )
    max_retries: int = Field(default=2, ge=0, le=10)
    request_timeout_s: float = Field(default=120.0, gt=0, le=3_600)
    sweep_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="how often idle sessions leave memory and the usage outbox is swept",
    )
    usage_outbox_grace_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="how long a usage record waits in the outbox for its own replica's meter "
        "before any replica's sweep sends it",
    )
    custom_tools: tuple[str, ...] = Field(
        default=(), description="module:function tools agents may use (platform code, trusted)"
    )
    egress_blocked: tuple[str, ...] = Field(
        default=(),
        description="addresses or CIDRs egress tools may not reach, besides the cluster's own "
        "(say, the Hypercore host's public address)",
    )
    egress_refresh_s: float = Field(
        default=30.0, gt=0, le=3_600, description="how often the egress rules learn new nodes"
    )
    model_transport: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp",
        description="the model client's HTTP transport: aiohttp spends about a third less CPU "
        "reading a stream (both honour HTTP(S)_PROXY and NO_PROXY)",
    )

    @field_validator("egress_blocked")
    @classmethod
    def _networks(cls, blocked: tuple[str, ...]) -> tuple[str, ...]:
        for entry in blocked:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as e:
                raise ValueError(f"egress_blocked: {e}") from e
        return blocked


def default_workspaces() -> Path:
    """Root's sandboxed tools run as ``nobody``, who must be able to reach the directory, so not
    under /root; an unprivileged replica's tools run as itself, under its home."""
    if os.geteuid() == 0:
        return Path("/var/lib/hyperfleet/workspaces")
    return Path.home() / ".hyperfleet" / "workspaces"


def _key_from_environment() -> SecretStr:
    key = os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        raise InvalidRequestError(
            "no Anthropic key: the agent has none, the platform config has none, and "
            "ANTHROPIC_API_KEY is not set on this node"
        )
    return SecretStr(key)


def _build_client(key: SecretStr, runtime: RuntimeConfig) -> anthropic.AsyncAnthropic:
    """Runs on ``PendingClient``'s thread: the SDK import is the slow part of a replica's start."""
    return model_client(
        key.get_secret_value(),
        runtime.anthropic_base_url,
        # getattr: a config pickled by an ingress from before this field (a rolling upgrade)
        transport=getattr(runtime, "model_transport", "aiohttp"),
        max_retries=runtime.max_retries,
        timeout_s=runtime.request_timeout_s,
    )


def model_client(
    api_key: str,
    base_url: str | None,
    *,
    transport: Literal["aiohttp", "httpx"] = "aiohttp",
    max_retries: int = 2,
    timeout_s: float = 120.0,
    default_headers: Mapping[str, str] | None = None,
) -> anthropic.AsyncAnthropic:
    """The official client as a replica uses it.

    Reading a stream is most of a replica's CPU per turn (a model sends an event a token): the
    SDK's aiohttp transport spends 5.3 ms a 32-event call where httpx spends 8.3 (2026-12-02).
    Both transports take HTTP(S)_PROXY and NO_PROXY from the environment (httpx mounts the
    aiohttp transport per proxy); aiohttp has no SOCKS proxies, so ``socks*://`` needs httpx.
    """
    import anthropic
    import httpx2

    timeout = httpx2.Timeout(timeout_s, connect=10.0)
    http_client = (
        anthropic.DefaultAioHttpClient(timeout=timeout) if transport == "aiohttp" else None
    )
    return anthropic.AsyncAnthropic(
        api_key=api_key,
        base_url=base_url,
        max_retries=max_retries,
        timeout=timeout,
        http_client=http_client,
        default_headers=dict(default_headers or {}),
    )


def sandbox_limits(spec: AgentSpec) -> SandboxLimits:
    """The spec's ``tool_limits`` as the sandbox applies them."""
    limits = spec.tool_limits
    return SandboxLimits(
        processes=limits.processes,
        memory_bytes=limits.memory_mb * MIB,
        cpu_s=limits.cpu_s,
        file_size_bytes=limits.file_size_mb * MIB,
        tmp_bytes=limits.tmp_mb * MIB,
    )


def node_addresses() -> list[str]:
    """Every node's address in Ray's node table (live or recently dead): egress tools may reach
    none of them."""
    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    return sorted({str(node["NodeManagerAddress"]) for node in nodes})


def replica_name(agent_id: str, index: int) -> str:
    return f"agent-{agent_id}-{index}"


def build_host(
    agent_id: str,
    spec: AgentSpec,
    runtime: RuntimeConfig,
    client: anthropic.AsyncAnthropic | PendingClient,
    *,
    store: SessionStore | None = None,
    metering: Metering | None = None,
    stream_backoff_s: float = STREAM_BACKOFF_S,
    credential: SecretStr | None = None,
    firewall: EgressFirewall | None = None,
) -> SessionHost:
    """What a replica runs, wired from the agent's spec and the platform's runtime config: the
    spec's tools in the sandbox, the agent loop with its circuit breaker, the store, the
    workspaces. ``AgentActor`` builds its host here and so do the tests, so the two cannot drift.

    Args:
        client: the model client (a replica's ``PendingClient``; a test's own client).
        store: the session store; default, the one ``runtime.store_url`` names.
        metering: where the turns' usage goes (``OutboxMetering``; None, nowhere).
        stream_backoff_s: the loop's wait before retrying a broken stream (tests shorten it).
        credential: the Anthropic key ``client`` calls with: the loop shares this process's
            circuit breaker for it (``breaker.BREAKERS``); None, a breaker of its own.
        firewall: the egress firewall of the spec's tools; default, one that knows the
            operator's ``egress_blocked`` but not the cluster's nodes (``AgentActor`` gives its
            own, which lists them).
    """
    if firewall is None:
        firewall = EgressFirewall(runtime.egress_blocked, refresh_s=runtime.egress_refresh_s)
    sandbox = Sandbox(egress=spec.egress, limits=sandbox_limits(spec), firewall=firewall)
    tools = build_tools(spec.tools, sandbox, spec.tool_timeout_s, runtime.custom_tools)
    breaker = (
        BREAKERS.for_credential(credential.get_secret_value())
        if credential is not None
        else CircuitBreaker()
    )
    config = LoopConfig(
        model=spec.model,
        system=spec.system,
        max_tokens=spec.max_tokens,
        max_turns=spec.max_turns,
        temperature=spec.temperature,
        stream_backoff_s=stream_backoff_s,
    )
    return SessionHost(
        agent_id,
        spec,
        store if store is not None else open_store(runtime.store_url),
        AgentLoop(client, config, tools, breaker),
        Path(runtime.workspaces) if runtime.workspaces else default_workspaces(),
        metering=metering,
    )


class RayControlLink:
    """``ControlLink`` over Ray: the control-store actor, looked up by name (again after it
    died: one started anew is another actor), each call bounded by ``METER_CALL_TIMEOUT_S``."""

    def __init__(self) -> None:
        self._control: Any = None

    def _actor(self) -> Any:
        if self._control is None:
            self._control = ray.get_actor(CONTROL_ACTOR_NAME, namespace=NAMESPACE)
        return self._control

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            ref = getattr(self._actor(), method).remote(*args)
            return await asyncio.wait_for(ref, METER_CALL_TIMEOUT_S)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, HyperfleetError) and e.cause.status_code == 503:
                raise ControlUnavailable(e.cause.message) from None  # its Redis, say
            raise UsageRefused(repr(e.cause)[:500]) from None
        except (TimeoutError, ray.exceptions.RayActorError) as e:
            if isinstance(e, ray.exceptions.RayActorError):
                self._control = None
            raise ControlUnavailable(f"the control store did not answer {method}: {e!r}") from e

    async def record_usages(self, batch: list[UsageRecord]) -> bool:
        try:
            self._actor()
        except ValueError:  # batch jobs without the HTTP API: there is nothing to meter to
            return False
        await self._call("record_usages", batch)
        return True

    async def charge(
        self, record: UsageRecord, reservation: Reservation, next_tokens: int
    ) -> Charge:
        try:
            self._actor()
        except ValueError as e:
            raise ControlUnavailable("there is no control store to check the budget") from e
        charge: Charge = await self._call("charge", record, reservation, next_tokens)
        return charge


@ray.remote(max_restarts=-1, max_task_retries=0)
class AgentActor:
    def __init__(
        self,
        agent_id: str,
        index: int,
        spec: AgentSpec,
        runtime: RuntimeConfig,
        own_key: SecretStr | None = None,
    ) -> None:
        """``own_key`` is the agent's own Anthropic key when ``spawn_replica`` took it out of
        the spec; a spec given here directly (a batch job's) may carry it itself."""
        logs.configure("replica")
        self.name = replica_name(agent_id, index)
        key = (
            own_key
            or spec.anthropic_api_key
            or runtime.anthropic_api_key
            or _key_from_environment()
        )
        self._client = PendingClient(lambda: _build_client(key, runtime), self.name)
        self.agent_id = agent_id
        store = MeteredStore(open_store(runtime.store_url))
        self._metering = OutboxMetering(
            self.name, store, runtime.usage_outbox_grace_s, RayControlLink()
        )
        self._firewall = EgressFirewall(
            runtime.egress_blocked, node_addresses, refresh_s=runtime.egress_refresh_s
        )
        self.host = build_host(
            agent_id,
            spec,
            runtime,
            self._client,
            store=store,
            metering=self._metering,
            credential=key,
            firewall=self._firewall,
        )
        self._sweep_interval_s = runtime.sweep_interval_s
        self._sweeper: asyncio.Task[None] | None = None
        self._egress_refresher: asyncio.Task[None] | None = None
        self._egress_refresh_s = runtime.egress_refresh_s if spec.egress else None
        # An async actor's __init__ runs on its event loop: the gauges start with the replica,
        # so a replica still loading its model client shows as ``loading``.
        self._reporter = asyncio.get_running_loop().create_task(self._report_gauges())

    async def _report_gauges(self) -> None:
        """Sets the replica's gauges until it stops (Ray drops a gauge not set again within
        two report intervals: ``actors/metrics.py``)."""
        interval_s = metrics.gauge_refresh_s()
        while True:
            try:
                metrics.report_replica(
                    metrics.replica_gauges(self.host.stats(), self._client.state)
                )
            except Exception:  # a supervisory loop: one bad report must not end the gauges
                logger.exception("%s: the replica's gauges were not set", self.name)
            await asyncio.sleep(interval_s)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if self._egress_refresh_s is not None and self._egress_refresher is None:
            self._egress_refresher = asyncio.get_running_loop().create_task(
                self._refresh_egress(self._egress_refresh_s)
            )

    async def _refresh_egress(self, interval_s: float) -> None:
        """Keeps the egress rules current as nodes join, even while a long tool runs."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self._firewall.refresh)
            except EgressUnavailable as e:
                logger.error("%s: egress rules not refreshed: %s", self.name, e)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            evicted = self.host.evict_idle()
            if evicted:
                logger.info("%s evicted %d idle sessions", self.name, evicted)
            try:
                found = await self._metering.sweep()
            except HyperfleetError as e:
                logger.warning("%s: the usage outbox could not be read: %s", self.name, e)
            except Exception:  # a supervisory loop: it must outlive one bad sweep
                logger.exception("%s: the usage outbox sweep failed", self.name)
            else:
                if found:
                    metrics.outbox_swept(found)
                    logger.info("%s: metering %d records left in the outbox", self.name, found)

    async def open_session(
        self, owner: str, session_id: str | None = None, evict: bool = True
    ) -> dict[str, Any]:
        self._ensure_sweeper()
        return await self.host.open_session(owner, session_id, evict)

    async def send(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        idempotency_key: str | None = None,
        owner: str | None = None,
        reservation: Reservation | None = None,
        trace: Mapping[str, str] | None = None,
        if_busy: str = "reject",
    ) -> dict[str, Any]:
        """Runs a turn. ``reservation`` (the API's token reservation) is this replica's from now
        on: its metering ends it however the turn ends. ``trace`` (the request's id and
        ``traceparent``, ``hyperfleet.logs``) is on every log line of the turn. ``if_busy``
        (``reject``, ``enqueue``, ``interrupt``) says what happens when a turn is running."""
        self._ensure_sweeper()
        mode = _if_busy(if_busy)
        with logs.traced(**{**(trace or {}), "session_id": session_id, "agent_id": self.agent_id}):
            return await self.host.send(
                session_id, content, idempotency_key, owner, reservation, mode
            )

    async def stream(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        idempotency_key: str | None = None,
        owner: str | None = None,
        reservation: Reservation | None = None,
        trace: Mapping[str, str] | None = None,
        if_busy: str = "reject",
    ) -> AsyncIterator[dict[str, Any]]:
        self._ensure_sweeper()
        mode = _if_busy(if_busy)
        context = {**(trace or {}), "session_id": session_id, "agent_id": self.agent_id}
        stream = self.host.stream(
            session_id, content, idempotency_key, owner, reservation, context, mode
        )
        async for item in stream:
            yield item

    async def start(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        idempotency_key: str | None = None,
        owner: str | None = None,
        reservation: Reservation | None = None,
        trace: Mapping[str, str] | None = None,
        if_busy: str = "reject",
    ) -> dict[str, Any]:
        """Starts a background turn; answers ``{turn_id, session_id, status}`` once it is
        admitted. Follow it with ``events`` or ``turn_status``."""
        self._ensure_sweeper()
        mode = _if_busy(if_busy)
        context = {**(trace or {}), "session_id": session_id, "agent_id": self.agent_id}
        return await self.host.start(
            session_id, content, idempotency_key, owner, reservation, context, mode
        )

    async def turn_status(
        self, session_id: str, turn_id: str, owner: str | None = None
    ) -> dict[str, Any]:
        return await self.host.turn_status(session_id, turn_id, owner)

    async def events(
        self, session_id: str, owner: str | None = None, after: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """The session's events after id ``after``, then live while a turn runs or waits."""
        async for item in self.host.events(session_id, owner, after):
            yield item

    async def transcript(
        self, session_id: str, owner: str | None = None, after: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        return await self.host.transcript(session_id, owner, after, limit)

    async def close_session(self, session_id: str, owner: str | None = None) -> None:
        await self.host.close_session(session_id, owner)

    async def stats(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            **self.host.stats(),
            "replica": self.name,
            "node_id": context.get_node_id(),
            "pid": os.getpid(),
            "model_client": self._client.state,
            "resources": context.get_assigned_resources(),  # type: ignore[no-untyped-call]
        }

    async def health(self) -> str:
        await self.host.store.ping()
        return "ok"

    async def drain(self, deadline_s: float = 30.0) -> list[str]:
        handed = await self.host.drain(deadline_s)
        await self._flush_usage()
        return handed

    async def retire(self, deadline_s: float = 30.0) -> list[str]:
        """Drains, then removes the agent's workspace files on this node: the agent is being
        deleted. Returns the sessions handed back to the store."""
        handed = await self.host.drain(deadline_s)
        await self._flush_usage()
        await self.host.purge()
        return handed

    async def _flush_usage(self) -> None:
        if not await self._metering.flush(METER_FLUSH_S):
            logger.error("%s: usage not sent yet (the outbox keeps it)", self.name)

    async def __ray_shutdown__(self) -> None:
        for task in (self._sweeper, self._egress_refresher, self._reporter):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._flush_usage()
        await self._client.close()


def _if_busy(value: str) -> IfBusy:
    for mode in IF_BUSY:
        if value == mode:
            return mode
    raise InvalidRequestError(f"if_busy must be one of {', '.join(IF_BUSY)}, not {value!r}")


def spawn_replica(agent_id: str, index: int, spec: AgentSpec, runtime: RuntimeConfig) -> Any:
    """Starts replica ``index`` of an agent (or returns it if it runs); placed from its spec.

    The agent's own Anthropic key travels as an argument of its own: a small argument is inlined
    in the actor's creation task (which the GCS keeps in memory, to restart the replica), while
    one over 100 KiB (a spec with a long system prompt) would go through the object store, which
    spills to disk under memory pressure (docs/security.md)."""
    without_key = spec.model_copy(update={"anthropic_api_key": None})
    return AgentActor.options(  # type: ignore[attr-defined]
        name=replica_name(agent_id, index),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **placement_options(spec),
    ).remote(agent_id, index, without_key, runtime, spec.anthropic_api_key)
