"""One load generator: a share of the run's virtual users in this process, on one event loop,
watching its own health, and what it saw at the end.

``hyperfleet loadtest`` runs one ``Generator`` in its own process (``--workers 1``), or one in
each of N Ray actors (``distributed``); either way the generator is plain Python and its result
is the same ``GeneratorResult``, which ``shares.merge`` turns into the report's inputs.
Generators of one run start at a common wall-clock instant, so the times in their outcomes
(seconds since each one's start) line up; each says how late it actually began, and the merge
moves its times by that much.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from .columns import OutcomeColumns
from .monitor import ClientMonitor
from .users import MAX_OPEN_SESSIONS, Live, Load, Plan, Target

# The window of the progress line's rate, latency and lag.
RECENT_S = 10.0
# A start further ahead than this is a clock gone wrong: the generator starts at once.
START_WAIT_MAX_S = 60.0


@dataclass(frozen=True)
class Share:
    """One generator's part of a run: its own plan (users, seed, rate) and run id."""

    index: int
    plan: Plan
    # Unique among the run's generators: its virtual users' idempotency keys start with it.
    run_id: str


@dataclass(frozen=True)
class Counters:
    """What the progress line reads from one generator, once a second."""

    started: bool
    elapsed_s: float
    sessions_open: int
    in_flight: int
    completed: int
    failed: int
    retries: int
    cpu_percent: float
    lag_p99_ms: float  # over the last RECENT_S
    # End-to-end latency of the messages completed since the previous call.
    latencies_s: array[float]
    warnings: tuple[str, ...]  # the tester's own saturation, over the last RECENT_S


@dataclass(frozen=True)
class GeneratorResult:
    """A generator's run: its outcomes (times since its own start), its own load, and its
    counts. ``error`` set: it failed, and nothing else in it was measured."""

    index: int
    outcomes: OutcomeColumns
    elapsed_s: float = 0.0
    # How long after the run's common start it began (0 when it was not given one).
    late_s: float = 0.0
    # When its load began, ``time.time()``: the zero of its outcomes' times.
    started_at: float = 0.0
    cpu_s: float = 0.0
    cpu_percent: float = 0.0
    lags_ms: array[float] = field(default_factory=lambda: array("d"))
    dropped_arrivals: int = 0
    rate_limited: int = 0
    rate_limits_seen: frozenset[int] = frozenset()
    warnings: tuple[str, ...] = ()
    node: str = ""  # where it ran, when on a cluster
    error: str | None = None

    @classmethod
    def failed(cls, index: int, error: str, node: str = "") -> GeneratorResult:
        return cls(index, OutcomeColumns.of(()), node=node, error=error)


def connection_limit(plan: Plan) -> int:
    """Connections one generator's HTTP pool may hold: one a user, or the open-loop bound."""
    return plan.users + 8 if plan.rate is None else MAX_OPEN_SESSIONS


class Generator:
    """A share of the load in this process. Not reusable: ``run`` once."""

    def __init__(self, share: Share, wall_clock: Callable[[], float] = time.time) -> None:
        self.share = share
        self.live = Live()
        self.wall_clock = wall_clock
        self.monitor: ClientMonitor | None = None
        self.load: Load | None = None
        self._seen = 0  # outcomes the progress line has read

    async def run(
        self,
        target: Target,
        start_at: float | None = None,
        http: aiohttp.ClientSession | None = None,
    ) -> GeneratorResult:
        """Apply the share's load to ``target``, at wall-clock time ``start_at`` (``time.time``)
        when given, through ``http`` (else a pool of its own)."""
        if http is None:
            connector = aiohttp.TCPConnector(limit=connection_limit(self.share.plan))
            async with aiohttp.ClientSession(connector=connector) as own:
                return await self.run(target, start_at, own)
        late_s = 0.0
        if start_at is not None:
            delay = start_at - self.wall_clock()
            if delay > 0:
                await asyncio.sleep(min(delay, START_WAIT_MAX_S))
            late_s = max(0.0, self.wall_clock() - start_at)
        share = self.share
        monitor = self.monitor = ClientMonitor()
        load = self.load = Load(http, target, share.plan, share.run_id, self.live)
        started_at = self.wall_clock()
        sampler = asyncio.create_task(monitor.sample())
        try:
            await load.run()
            elapsed = load.clock() - load.t0
        finally:
            monitor.stop()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        live = self.live
        warnings = monitor.warnings()
        if live.dropped_arrivals:
            warnings.append(
                f"{live.dropped_arrivals} arrivals were dropped: {MAX_OPEN_SESSIONS} sessions "
                "were open already (the tester's bound, per process)"
            )
        return GeneratorResult(
            index=share.index,
            outcomes=OutcomeColumns.of(live.outcomes),
            elapsed_s=elapsed,
            late_s=late_s,
            started_at=started_at,
            cpu_s=monitor.cpu_s(),
            cpu_percent=monitor.cpu_percent(),
            lags_ms=array("d", (lag for _, lag in monitor.lags_ms)),
            dropped_arrivals=live.dropped_arrivals,
            rate_limited=live.rate_limited,
            rate_limits_seen=frozenset(live.rate_limits_seen),
            warnings=tuple(warnings),
        )

    def counters(self) -> Counters:
        """The live counts, and the latencies completed since the last call (each is read
        once: one reader, the progress line)."""
        live, monitor, load = self.live, self.monitor, self.load
        outcomes = live.outcomes
        new = outcomes[self._seen :]
        self._seen = len(outcomes)
        latencies = array("d", (o.e2e_s for o in new if o.ok and o.op == "message"))
        since = time.perf_counter() - RECENT_S
        return Counters(
            started=load is not None,
            elapsed_s=0.0 if load is None else load.since_start(),
            sessions_open=live.sessions_open,
            in_flight=live.in_flight,
            completed=live.completed,
            failed=live.failed,
            retries=live.retries,
            cpu_percent=0.0 if monitor is None else monitor.cpu_percent(),
            lag_p99_ms=0.0 if monitor is None else monitor.lag_p99_ms(since),
            latencies_s=latencies,
            warnings=() if monitor is None else tuple(monitor.warnings(since)),
        )
