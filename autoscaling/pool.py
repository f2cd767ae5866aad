"""The pool controller: every few seconds, observe each agent's replicas, decide, act.

It holds nothing that matters in memory. The replicas' rows (starting, ready, draining, with a
draining replica's deadline) and each pool's policy state (cooldowns, the trend's samples) are in
the control store; a restarted controller reads them, resumes the starts and drains it finds
under way, and keeps its cooldowns. What it would lose is only the capacity refusals counted
since its last tick.

Acting:

- Up: the control store allocates rows (``starting``; the fleet's cap and the owner's quotas
  bound how many), the replicas are asked of Ray at once and become ``ready`` when they answer a
  health check. A replica Ray cannot place yet is a pending actor: demand that Ray's autoscaler
  turns into a VM through the Hypercore provider. The warm pool asks Ray for replica slots ahead of
  demand with ``request_resources`` (a total: the slots in use plus the spare, at least the floor).
- Down: a starting replica is stopped first (it holds nothing). Otherwise the ready replica with
  the fewest sessions drains: its row says ``draining`` (the ingress places no new session there),
  the replica refuses new turns with ``session_moved`` and finishes those running (up to the
  agent's turn timeout), its sessions' routes move to the least-loaded ready replicas, then it
  stops and its row goes. A client whose message meets the drain is moved by the ingress and
  resent (``serve_app/app.py``): no error reaches it.
- A session open that found every ready replica full asks ``request_capacity``: a refusal for the
  policy (aggressive, and past the up cooldown), then a wait for a replica to become ready.
- Liveness: every tick probes each ready replica (its ``stats``). One that has answered no probe
  for ``replica_unresponsive_s`` (a process paused or hung, a node cut off, a restart that does
  not come back) is replaced: above the pool's min, its row turns ``draining`` (no new session
  goes there), its routes move to the other ready replicas, and it is killed (Ray ends even a
  SIGSTOPped process, within about 5 s) and its row removed; the policy then starts another if
  the pool needs one. One of ``0..min-1`` is killed for Ray to restart under its name and keeps
  its sessions, as after a crash. A turn it was running fails to its client as retryable and the
  resend runs on the session's replica. Should the old process still reach the store (a
  partition), its commit is refused: the session's version moved on (the store's fence). When
  every one of two or more replicas is silent at once, none is replaced (the trouble is likelier
  on the prober's side), and at most one is replaced per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.spec import AgentSpec, placement_options
from hyperfleet.errors import HyperfleetError
from serve_app.backend import CONTROL_TIMEOUT_S, Control
from serve_app.records import PoolAgent, ReplicaRow
from serve_app.replicas import Replicas

from . import pool_metrics as metrics
from .pool_config import PoolConfig, drain_deadline_s, policy_for
from .pool_policy import Decision, Observation, PoolState, decide

logger = logging.getLogger(__name__)

STEP_CONCURRENCY = 32  # agents observed at once in one tick
RECORD_EVERY_S = 30.0  # an unchanged pool's state is stored at most this often
START_BACKOFF_S = 5.0  # after a failed start; doubling up to the max
START_BACKOFF_MAX_S = 300.0
DEFAULT_SLOT = {"CPU": 1.0}  # a spare replica slot: an AgentSpec's default resources


@dataclass(frozen=True)
class PoolStatus:
    """One agent's pool as the controller last saw it."""

    desired: int
    reason: str
    ready: int
    starting: int
    draining: int
    sessions: int

    def counts(self) -> dict[str, int]:
        return {
            "desired": self.desired,
            "ready": self.ready,
            "starting": self.starting,
            "draining": self.draining,
        }


class PoolController:
    def __init__(
        self,
        control: Control,
        replicas: Replicas,
        config: PoolConfig,
        request_resources: Callable[[list[dict[str, float]]], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``request_resources`` tells Ray's autoscaler the replica slots to keep (None: no
        warm pool, as in a test); ``clock`` is wall-clock seconds (the policy's state is kept
        across restarts, so not a monotonic clock)."""
        self.control = control
        self.replicas = replicas
        self.config = config
        self._request_resources = request_resources
        self._clock = clock
        self._refused: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._slots: list[dict[str, float]] | None = None
        self._recorded: dict[str, tuple[tuple[Any, ...], float]] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # agent -> (until, last wait)
        # (agent, index) -> (when the first of the probes it has left unanswered in a row began,
        # when the last one did), in monotonic seconds.
        self._silent: dict[tuple[str, int], tuple[float, float]] = {}
        self.status: dict[str, PoolStatus] = {}

    # The loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:  # a supervisory loop: one bad tick must not end scaling
                logger.exception("the pool controller's tick failed")
            await asyncio.sleep(max(0.0, self.config.tick_s - (time.monotonic() - started)))

    async def tick(self) -> None:
        agents = await self.control.pool_agents()
        limit = asyncio.Semaphore(STEP_CONCURRENCY)

        async def one(agent: PoolAgent) -> None:
            async with limit:
                try:
                    await self._step(agent)
                except HyperfleetError as e:  # the store or a replica did not answer: next tick
                    logger.warning("pool %s: %s", agent.id, e)
                except Exception:  # one agent's bad step must not stop the others' scaling
                    logger.exception("pool %s: the step failed", agent.id)

        await asyncio.gather(*(one(a) for a in agents))
        live = {a.id for a in agents}
        for table in (self.status, self._locks, self._ready, self._recorded, self._backoff):
            for gone in set(table) - live:
                table.pop(gone, None)
        for key in [k for k in self._silent if k[0] not in live]:
            del self._silent[key]
        for agent_id, status in self.status.items():
            metrics.pool(agent_id, status.counts())
        await self._keep_warm(agents)

    async def request_capacity(self, agent_id: str, wait_s: float | None = None) -> bool:
        """A session open found every ready replica of ``agent_id`` full: count the refusal,
        scale now, and wait (up to ``wait_s``, default ``capacity_wait_s``) for a replica to
        become ready. True when one did."""
        wait_s = self.config.capacity_wait_s if wait_s is None else wait_s
        event = self._ready.setdefault(agent_id, asyncio.Event())
        agent = await self.control.pool_agent(agent_id)
        if agent is None:
            return False
        live = [r for r in agent.replicas if r.state != "draining"]
        starting = any(r.state == "starting" for r in agent.replicas)
        if not starting and len(live) >= AgentSpec.model_validate_json(agent.spec).replicas.max:
            return False  # at its max, none on its way: no step, however many opens ask
        lock = self._locks.setdefault(agent_id, asyncio.Lock())
        if not lock.locked() and not starting:
            # With replicas already starting, the refusal waits for them instead of doubling
            # the pool again.
            self._refused[agent_id] = self._refused.get(agent_id, 0) + 1
            await self._step(agent)
            rows = await self.control.agent_replicas(agent_id)
            if not any(r.state == "starting" for r in rows):
                return False  # at its max, or the fleet's cap or the owner's quota: no wait
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), wait_s)
        return event.is_set()

    # One agent ------------------------------------------------------------------------------

    async def _step(self, agent: PoolAgent) -> None:
        lock = self._locks.setdefault(agent.id, asyncio.Lock())
        async with lock:
            if not agent.spec:  # deleted: stop whatever of it still runs
                await self._stop_all(agent)
                return
            # Read again under the lock: a concurrent step may have changed the rows.
            fresh = await self.control.pool_agent(agent.id)
            if fresh is None:
                return  # deleted meanwhile: the next tick stops it
            rows = list(fresh.replicas)
            spec = AgentSpec.model_validate_json(fresh.spec)
            self._resume(agent.id, spec, rows)
            by_state = {s: [r for r in rows if r.state == s] for s in ("starting", "ready")}
            draining = [r for r in rows if r.state == "draining"]
            probed_at = time.monotonic()
            stats = await self.replicas.stats(
                agent.id, [r.index for r in by_state["ready"]], self._probe_timeout_s()
            )
            hung = self._unresponsive(agent.id, by_state["ready"], stats, probed_at)
            for row in hung:
                await self._replace(agent.id, row.index, spec.replicas.min)
            if hung:
                alive = [(r, s) for r, s in zip(by_state["ready"], stats, strict=True)]
                alive = [(r, s) for r, s in alive if r not in hung]
                by_state["ready"] = [r for r, _ in alive]
                stats = [s for _, s in alive]
            sessions = {
                r.index: int(s.get("sessions") or 0)
                for r, s in zip(by_state["ready"], stats, strict=True)
            }
            seen = Observation(
                sessions=sum(sessions.values()),
                busy=sum(int(s.get("busy_sessions") or 0) for s in stats),
                refused=self._refused.pop(agent.id, 0),
                ready=len(by_state["ready"]),
                starting=len(by_state["starting"]),
                draining=len(draining),
            )
            state = PoolState()
            if fresh.pool is not None and fresh.pool.state not in ("", "{}"):
                state = PoolState.from_json(json.loads(fresh.pool.state))
            now = self._clock()
            decision = decide(policy_for(spec, self.config), state, seen, now)
            await self._record(agent.id, decision, now)
            metrics.decided(decision.reason, decision.delta)
            if decision.delta > 0 and now >= self._backoff.get(agent.id, (0.0, 0.0))[0]:
                await self._add(agent.id, decision.delta)
            elif decision.delta < 0:
                await self._remove(agent.id, spec, by_state, sessions, -decision.delta)
            self.status[agent.id] = PoolStatus(
                decision.desired,
                decision.reason,
                seen.ready,
                seen.starting,
                seen.draining,
                seen.sessions,
            )
            logger.debug(
                "pool %s: %s -> %s (%s)", agent.id, seen, decision.desired, decision.reason
            )

    def _probe_timeout_s(self) -> float:
        """A probe's wait: a third of the unresponsive limit (so that several probes go
        unanswered before a replica is replaced), at most the control calls' timeout."""
        return min(CONTROL_TIMEOUT_S, max(1.0, self.config.replica_unresponsive_s / 3))

    def _unresponsive(
        self,
        agent_id: str,
        ready: list[ReplicaRow],
        stats: list[dict[str, Any]],
        probed_at: float,
    ) -> list[ReplicaRow]:
        """The ready replica to replace: one that has left every probe unanswered, probe after
        probe, for ``replica_unresponsive_s`` (monotonic time). Guards against the prober's own
        trouble: a gap between probes (a failed step, a control-store outage) starts the count
        over; when every one of two or more ready replicas is silent at once, the likelier cause
        is on this side (the head, the GCS), and none is replaced; and at most one is replaced
        per step."""
        limit_s = self.config.replica_unresponsive_s
        gap_s = 2 * (self.config.tick_s + self._probe_timeout_s())
        silent = []
        for row, answer in zip(ready, stats, strict=True):
            key = (agent_id, row.index)
            if answer.get("state") != "unavailable":
                self._silent.pop(key, None)
                continue
            since, last = self._silent.get(key, (probed_at, probed_at))
            if probed_at - last > gap_s:
                since = probed_at  # not probed for a while: this miss starts a new count
            self._silent[key] = (since, probed_at)
            silent.append((row, since))
        # Forget what no longer is a ready replica of this agent (drained, removed).
        indices = {row.index for row in ready}
        for key in [k for k in self._silent if k[0] == agent_id and k[1] not in indices]:
            del self._silent[key]
        if len(ready) >= 2 and len(silent) == len(ready):
            return []
        overdue = [(row, since) for row, since in silent if probed_at - since >= limit_s]
        return [min(overdue, key=lambda pair: pair[1])[0]] if overdue else []

    async def _replace(self, agent_id: str, index: int, base: int) -> None:
        """Takes an unresponsive replica out. One above ``base`` (the pool's min) is gone for
        good: no new sessions, its routes moved to the ready replicas, killed, its row removed.
        One of 0..``base``-1 (which a batch job may address by name) is killed for Ray to
        restart under its name, keeping its sessions as after a crash (they reload from the
        store); its routes are not moved, so no ingress that cached one reaches a second home."""
        self._silent.pop((agent_id, index), None)
        moved = 0
        if index < base:
            if not self.replicas.kill(agent_id, index, restart=True):
                # No such actor any more: the row goes back to starting, which starts it.
                await self.control.set_replica_state(agent_id, index, "starting")
        else:
            task = self._tasks.pop((agent_id, index), None)
            if task is not None:
                task.cancel()
            await self.control.set_replica_state(agent_id, index, "draining", self._clock())
            moved = await self.control.rehome_all(agent_id, index)
            self.replicas.kill(agent_id, index)
            await self.control.remove_replica(agent_id, index)
        metrics.replaced(moved)
        logger.warning(
            "pool %s: replica %d answered no probe for %.0f s: %s (%d routes moved)",
            agent_id,
            index,
            self.config.replica_unresponsive_s,
            "restarted" if index < base else "replaced",
            moved,
        )

    async def _record(self, agent_id: str, decision: Decision, now: float) -> None:
        """Stores the decision and the policy's state: at once when the decision or a cooldown
        changed, else at most every ``RECORD_EVERY_S`` (the trend's samples change every tick;
        a restart that loses a few of them loses little, and the control store is spared a
        write per agent per tick)."""
        s = decision.state
        key = (decision.desired, decision.reason, s.last_up_at, s.last_down_at, s.below_since)
        last = self._recorded.get(agent_id)
        if last is not None and last[0] == key and now - last[1] < RECORD_EVERY_S:
            return
        await self.control.record_pool(
            agent_id, decision.desired, decision.reason, json.dumps(s.to_json())
        )
        self._recorded[agent_id] = (key, now)

    def _resume(self, agent_id: str, spec: AgentSpec, rows: list[ReplicaRow]) -> None:
        """Starts and drains under way whose task this process does not run (it restarted)."""
        for row in rows:
            if (agent_id, row.index) in self._tasks:
                continue
            if row.state == "starting":
                self._spawn_task(agent_id, row.index, self._start(agent_id, row.index))
            elif row.state == "draining":
                left_s = max(0.0, (row.deadline or 0.0) - self._clock())
                self._spawn_task(agent_id, row.index, self._drain(agent_id, row.index, left_s))

    async def _add(self, agent_id: str, count: int) -> None:
        indices = await self.control.add_replicas(agent_id, count, self.config.fleet_max_replicas)
        if len(indices) < count:
            metrics.capped(count - len(indices))
            logger.warning(
                "pool %s: %d replicas wanted, %d allowed (the fleet's cap or the owner's quota)",
                agent_id,
                count,
                len(indices),
            )
        for index in indices:
            self._spawn_task(agent_id, index, self._start(agent_id, index))

    async def _remove(
        self,
        agent_id: str,
        spec: AgentSpec,
        by_state: dict[str, list[ReplicaRow]],
        sessions: dict[int, int],
        count: int,
    ) -> None:
        # Starting replicas hold nothing: they go first, newest first. One that turned ready
        # since the rows were read is not removed here (it may hold sessions already).
        for row in sorted(by_state["starting"], key=lambda r: -r.index)[:count]:
            if not await self.control.remove_replica(agent_id, row.index, "starting"):
                continue
            task = self._tasks.pop((agent_id, row.index), None)
            if task is not None:
                task.cancel()
            self.replicas.kill(agent_id, row.index)
            count -= 1
        # The fewest sessions first; replicas 0..min-1 last (a batch job may address them by
        # name: they are drained only when nothing else is left to remove).
        base = spec.replicas.min
        victims = sorted(
            by_state["ready"],
            key=lambda r: (r.index < base, sessions.get(r.index, 0), -r.index),
        )
        deadline_s = drain_deadline_s(spec, self.config)
        for row in victims[:count]:
            deadline = self._clock() + deadline_s
            await self.control.set_replica_state(agent_id, row.index, "draining", deadline)
            self._spawn_task(agent_id, row.index, self._drain(agent_id, row.index, deadline_s))

    def _spawn_task(self, agent_id: str, index: int, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:  # a supervisory boundary: the next tick resumes from the rows
                logger.exception("pool %s: replica %d's start or drain failed", agent_id, index)
            finally:
                self._tasks.pop((agent_id, index), None)

        self._tasks[(agent_id, index)] = asyncio.get_running_loop().create_task(run())

    async def _start(self, agent_id: str, index: int) -> None:
        started = time.monotonic()
        opened = await self.control.replica_spec(agent_id)  # with its own key: only here
        if opened is None:  # deleted meanwhile
            await self.control.remove_replica(agent_id, index)
            return
        handle = self.replicas.start(agent_id, index, AgentSpec.model_validate_json(opened))
        try:
            await asyncio.wait_for(handle.health.remote(), self.config.start_timeout_s)
        except (RayActorError, RayTaskError, TimeoutError, GetTimeoutError) as e:
            logger.error("pool %s: replica %d did not start: %r", agent_id, index, e)
            metrics.started("failed")
            self.replicas.kill(agent_id, index)
            await self.control.remove_replica(agent_id, index)
            self._back_off(agent_id)
            return
        if not await self.control.set_replica_state(agent_id, index, "ready"):
            self.replicas.kill(agent_id, index)  # its agent was deleted meanwhile
            return
        self._backoff.pop(agent_id, None)
        metrics.started("ready", time.monotonic() - started)
        event = self._ready.pop(agent_id, None)
        if event is not None:
            event.set()

    def _back_off(self, agent_id: str) -> None:
        """After a failed start, no new replica of the agent for a while, doubling up to
        ``START_BACKOFF_MAX_S``: a replica that cannot start (a bad node, a store outage) must
        not become a new actor, and for ``vm`` isolation new VM demand, on every tick."""
        _, last_s = self._backoff.get(agent_id, (0.0, 0.0))
        wait_s = min(START_BACKOFF_MAX_S, max(START_BACKOFF_S, 2 * last_s))
        self._backoff[agent_id] = (self._clock() + wait_s, wait_s)

    async def _drain(self, agent_id: str, index: int, deadline_s: float) -> None:
        started = time.monotonic()
        try:
            handed = await self.replicas.drain(agent_id, index, deadline_s)
        except HyperfleetError as e:  # gone already (its node died, say): nothing to finish
            logger.warning("pool %s: replica %d did not drain: %s", agent_id, index, e)
            handed = []
        moved = await self.control.rehome_all(agent_id, index)
        self.replicas.kill(agent_id, index)
        await self.control.remove_replica(agent_id, index)
        metrics.drained(time.monotonic() - started, moved)
        logger.info(
            "pool %s: replica %d drained (%d sessions handed back, %d routes moved)",
            agent_id,
            index,
            len(handed),
            moved,
        )

    async def _stop_all(self, agent: PoolAgent) -> None:
        for row in agent.replicas:
            task = self._tasks.pop((agent.id, row.index), None)
            if task is not None:
                task.cancel()
            self.replicas.kill(agent.id, row.index)
        await self.control.drop_pool(agent.id)

    # The warm pool --------------------------------------------------------------------------

    async def _keep_warm(self, agents: list[PoolAgent]) -> None:
        """Asks Ray's autoscaler for the replica slots in use plus ``warm_spare`` (at least
        ``warm_floor`` in all), when that changed since the last ask."""
        if self._request_resources is None:
            return
        slots: list[dict[str, float]] = []
        if not (self.config.warm_floor or self.config.warm_spare):
            # No warm pool: ask for nothing (which also withdraws an earlier ask).
            if self._slots != slots:
                await self._request_resources(slots)
                self._slots = slots
            return
        for agent in agents:
            if not agent.spec:
                continue
            shape = slot_of(AgentSpec.model_validate_json(agent.spec))
            slots.extend(shape for _ in agent.replicas)
        spare = max(self.config.warm_spare, self.config.warm_floor - len(slots))
        slots.extend(dict(DEFAULT_SLOT) for _ in range(spare))
        if slots != self._slots:
            await self._request_resources(slots)
            self._slots = slots


def slot_of(spec: AgentSpec) -> dict[str, float]:
    """One replica of ``spec`` as a resource bundle for ``request_resources``."""
    options: dict[str, Any] = placement_options(spec)
    bundle = {"CPU": float(options["num_cpus"]), **options["resources"]}
    if options.get("num_gpus"):
        bundle["GPU"] = float(options["num_gpus"])
    return {k: v for k, v in bundle.items() if v}
