"""A load test from start to end: set up its tenant, apply the load while showing a progress
line and watching the tester's own health, clean up, and report.

A load generator that saturates measures itself: its event loop falls behind, every latency
it records grows, and the API is blamed. So the tester samples its own event-loop lag (how
late a short sleep wakes) and its CPU time for the whole run, reports both, and warns when
the lag's p99 passes ``LAG_WARN_MS`` or the CPU ``CPU_WARN_PERCENT`` of a core: its numbers are
then a floor, and the load should be split across processes or machines.

One process, one event loop: it holds thousands of idle sessions, but each answer costs it
JSON (or SSE) parsing on one core, so it tops out at a few thousand requests a second with
small answers, far less with long streams. The warnings say when it gets close.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import math
import secrets
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import aiohttp

from .report import ClientStats, LoadTestReport, RunConfig, Thresholds, build_report, percentile
from .tenant import Provisioned, SetupError, provision, release
from .users import MAX_OPEN_SESSIONS, Live, Load, Plan

LAG_INTERVAL_S = 0.05
LAG_SAMPLES_MAX = 500_000
LAG_WARN_MS = 50.0
CPU_WARN_PERCENT = 70.0
PROGRESS_INTERVAL_S = 1.0
# Without a terminal (a CI log), a progress line every this many seconds, not every second.
PROGRESS_LOG_INTERVAL_S = 10.0
RECENT_S = 10.0


@dataclass(frozen=True)
class LoadTestConfig:
    api_url: str
    api_key: str
    plan: Plan
    thresholds: Thresholds
    anthropic_key: str | None = None
    progress: bool = True


class ClientMonitor:
    """The tester's own load: event-loop lag sampled every ``LAG_INTERVAL_S``, CPU seconds."""

    def __init__(self) -> None:
        self.lags_ms: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=LAG_SAMPLES_MAX
        )
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()
        self.stopped: tuple[float, float] | None = None  # (CPU, wall) when the load ended

    def stop(self) -> None:
        self.stopped = (time.process_time(), time.perf_counter())

    async def sample(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(LAG_INTERVAL_S)
            now = time.perf_counter()
            self.lags_ms.append((now, max(0.0, (now - before - LAG_INTERVAL_S) * 1000.0)))

    def cpu_s(self) -> float:
        cpu = self.stopped[0] if self.stopped else time.process_time()
        return cpu - self.cpu0

    def cpu_percent(self) -> float:
        wall = (self.stopped[1] if self.stopped else time.perf_counter()) - self.wall0
        return 100.0 * self.cpu_s() / wall if wall > 0 else 0.0

    def lag_p99_ms(self, since: float = 0.0) -> float:
        recent = []
        for t, lag in reversed(self.lags_ms):
            if t < since:
                break
            recent.append(lag)
        return percentile(recent, 99) or 0.0

    def warnings(self, since: float = 0.0) -> list[str]:
        """What says the tester is near saturation, in the samples since ``since``."""
        found = []
        lag = self.lag_p99_ms(since)
        if lag > LAG_WARN_MS:
            found.append(
                f"the tester's event loop lagged {lag:.0f} ms (p99, over {LAG_WARN_MS:g} ms): "
                "its latencies include its own delay; split the load across processes"
            )
        cpu = self.cpu_percent()
        if cpu > CPU_WARN_PERCENT:
            found.append(
                f"the tester used {cpu:.0f} % of a core (over {CPU_WARN_PERCENT:g} %): it is "
                "near saturation; split the load across processes"
            )
        return found


def _progress_line(load: Load, live: Live, monitor: ClientMonitor) -> str:
    elapsed = load.since_start()
    window = min(RECENT_S, elapsed) or 1.0
    recent = []
    for outcome in reversed(live.outcomes):
        if outcome.end_s < elapsed - window:
            break
        if outcome.ok and outcome.op == "message":
            recent.append(outcome.e2e_s)
    p95 = percentile(recent, 95)
    p95_text = "-" if p95 is None else f"{p95:.3f} s"
    lag = monitor.lag_p99_ms(time.perf_counter() - RECENT_S)
    return (
        f"[{elapsed:6.1f} s] sessions {live.sessions_open}, in flight {live.in_flight} | "
        f"ok {live.completed}, failed {live.failed}, retries {live.retries} | "
        f"{len(recent) / window:.1f} req/s, p95 {p95_text} | "
        f"tester cpu {monitor.cpu_percent():.0f} %, lag p99 {lag:.1f} ms"
    )


async def _show_progress(load: Load, live: Live, monitor: ClientMonitor, out: TextIO) -> None:
    tty = out.isatty()
    interval = PROGRESS_INTERVAL_S if tty else PROGRESS_LOG_INTERVAL_S
    warned = False
    while True:
        await asyncio.sleep(interval)
        line = _progress_line(load, live, monitor)
        out.write(f"\r{line}\x1b[K" if tty else line + "\n")
        if not warned and (found := monitor.warnings(time.perf_counter() - RECENT_S)):
            warned = True
            out.write(("\n" if tty else "") + "".join(f"warning: {w}\n" for w in found))
        out.flush()


def _rate_limit_warning(live: Live, provisioned: Provisioned) -> str | None:
    if not live.rate_limited:
        return None
    limits = sorted(live.rate_limits_seen)
    shown = ", ".join(f"{n}" for n in limits) or "unknown"
    own = provisioned.requests_per_minute
    if own is not None and any(limit != own for limit in limits):
        return (
            f"{live.rate_limited} answers were 429 under a limit of {shown} a minute, not the "
            "test user's: one client address meets the API's per-address limit. Start the "
            "stack with that address exempt, e.g. `hyperfleet up --ip-exempt 127.0.0.1/32`"
        )
    return (
        f"{live.rate_limited} answers were 429 (limit {shown} a minute): the user's "
        "requests_per_minute, or the API's per-address limit, which a load generator on one "
        "address meets (`hyperfleet up --ip-exempt CIDR` exempts it)"
    )


def run_config(plan: Plan) -> RunConfig:
    return RunConfig(
        mode="closed" if plan.rate is None else "open",
        users=plan.users,
        requests=plan.requests,
        think_time_s=plan.think_time_s,
        ramp_up_s=plan.ramp_up_s,
        duration_s=plan.duration_s,
        stream=plan.stream,
        tools_mix=plan.tools_mix,
        rate=plan.rate,
        timeout_s=plan.timeout_s,
        max_retries=plan.max_retries,
        seed=plan.seed,
    )


async def run_loadtest(config: LoadTestConfig, out: TextIO = sys.stderr) -> LoadTestReport:
    """Set up, apply the load, clean up, and report.

    Raises:
        SetupError: the API could not be reached, or refused the key or a setup step.
    """
    plan = config.plan
    base_url = config.api_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise SetupError(f"--api-url: an http:// or https:// URL, not {config.api_url!r}")
    run_id = secrets.token_hex(4)
    limit = plan.users + 8 if plan.rate is None else MAX_OPEN_SESSIONS
    connector = aiohttp.TCPConnector(limit=limit)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    async with aiohttp.ClientSession(connector=connector) as http:
        provisioned = await provision(
            http, base_url, config.api_key, plan, config.anthropic_key, run_id
        )
        live = Live()
        monitor = ClientMonitor()
        load = Load(http, provisioned.target, plan, run_id, live)
        helpers = [asyncio.create_task(monitor.sample())]
        if config.progress:
            helpers.append(asyncio.create_task(_show_progress(load, live, monitor, out)))
        try:
            await load.run()
            elapsed = load.clock() - load.t0
        finally:
            monitor.stop()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if config.progress and out.isatty():
                out.write(f"\r{_progress_line(load, live, monitor)}\x1b[K\n")
            for problem in await release(http, base_url, config.api_key, provisioned):
                out.write(f"warning: cleanup: {problem}\n")
            out.flush()
    warnings = monitor.warnings()
    if live.dropped_arrivals:
        warnings.append(
            f"{live.dropped_arrivals} arrivals were dropped: {MAX_OPEN_SESSIONS} sessions were "
            "open already (the tester's bound)"
        )
    if (limited := _rate_limit_warning(live, provisioned)) is not None:
        warnings.append(limited)
    outcomes = live.outcomes
    duration = max((o.end_s for o in outcomes), default=elapsed)
    lags = [lag for _, lag in monitor.lags_ms]
    client = ClientStats(
        processes=1,
        cpu_s=round(monitor.cpu_s(), 3),
        cpu_percent=round(monitor.cpu_percent(), 1),
        loop_lag_p99_ms=round(percentile(lags, 99) or 0.0, 3),
        loop_lag_max_ms=round(max(lags, default=0.0), 3),
        dropped_arrivals=live.dropped_arrivals,
        warnings=warnings,
    )
    return build_report(
        outcomes,
        config=run_config(plan),
        api_url=base_url,
        date=date,
        duration_s=duration if math.isfinite(duration) else elapsed,
        thresholds=config.thresholds,
        client=client,
    )


def run(config: LoadTestConfig, out: TextIO = sys.stderr) -> LoadTestReport:
    """``run_loadtest`` on a new event loop (the CLI's entry)."""
    return asyncio.run(run_loadtest(config, out))
