"""A load test from start to end: set up its tenant, apply the load (in this process, or in
``--workers`` generators on the Ray cluster) while showing a progress line and watching the
tester's own health, clean up, and report.

One process, one event loop: it holds thousands of idle sessions, but each answer costs it
JSON (or SSE) parsing on one core, so it tops out at a few thousand requests a second with
small answers, far less with long streams. The warnings say when it gets close
(``monitor.py``); ``--workers N`` then splits the load over N processes on the cluster's nodes
(``distributed.py``), and the report merges what they measured.

With N generators, the Ray cluster is joined and every generator started before the tenant
is made: a cluster that cannot run them costs nothing to clean up.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import secrets
import sys
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import aiohttp

from .generator import Counters, Generator, GeneratorResult, Share, connection_limit
from .progress import Poll, Progress, show_progress
from .report import LoadTestReport, RunConfig, Thresholds, build_report
from .shares import merge, run_bound_s, split
from .tenant import Provisioned, SetupError, provision, release
from .users import Plan, Target

if TYPE_CHECKING:
    from .distributed import Fleet

# The driver's pool with a fleet: the setup's and the cleanup's calls alone.
SETUP_CONNECTIONS = 8


@dataclass(frozen=True)
class LoadTestConfig:
    api_url: str
    api_key: str
    plan: Plan
    thresholds: Thresholds
    anthropic_key: str | None = None
    progress: bool = True
    # Load generators: 1 runs in this process; more run as Ray actors on the cluster.
    workers: int = 1
    # The Ray cluster for workers > 1: Ray's ``auto`` (``$RAY_ADDRESS``, else the local head)
    # when None.
    ray_address: str | None = None

    def __post_init__(self) -> None:
        """Raises ValueError naming ``--workers`` when the plan cannot be split that way."""
        split(self.plan, self.workers, "check")


def _rate_limit_warning(
    rate_limited: int, limits_seen: frozenset[int], provisioned: Provisioned
) -> str | None:
    if not rate_limited:
        return None
    limits = sorted(limits_seen)
    shown = ", ".join(f"{n}" for n in limits) or "unknown"
    own = provisioned.requests_per_minute
    if own is not None and any(limit != own for limit in limits):
        return (
            f"{rate_limited} answers were 429 under a limit of {shown} a minute, not the "
            "test user's: one client address meets the API's per-address limit. Start the "
            "stack with that address exempt, e.g. `hyperfleet up --ip-exempt 127.0.0.1/32`"
        )
    return (
        f"{rate_limited} answers were 429 (limit {shown} a minute): the user's "
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


async def _apply(
    config: LoadTestConfig,
    target: Target,
    shares: Sequence[Share],
    fleet: Fleet | None,
    http: aiohttp.ClientSession,
    out: TextIO,
) -> list[GeneratorResult]:
    """Apply the load, with the progress line: in this process, or on the fleet's generators."""
    poll: Poll
    work: Awaitable[list[GeneratorResult]]
    if fleet is None:
        generator = Generator(shares[0])

        async def poll_here() -> list[Counters | None]:
            return [generator.counters()]

        async def run_here() -> list[GeneratorResult]:
            return [await generator.run(target, http=http)]

        poll, work = poll_here, run_here()
    else:
        poll, work = fleet.poll, fleet.run(target, run_bound_s(config.plan))
    progress = Progress(len(shares))
    helper = asyncio.create_task(show_progress(progress, poll, out)) if config.progress else None
    try:
        results = await work
    finally:
        if helper is not None:
            helper.cancel()
            await asyncio.gather(helper, return_exceptions=True)
    if config.progress and out.isatty():
        progress.update(await poll())
        out.write(f"\r{progress.line()}\x1b[K\n")
    return results


async def run_loadtest(config: LoadTestConfig, out: TextIO = sys.stderr) -> LoadTestReport:
    """Set up, apply the load, clean up, and report.

    Raises:
        SetupError: the API could not be reached, or refused the key or a setup step; with
            ``workers`` above 1, the Ray cluster could not be joined or run the generators.
    """
    plan = config.plan
    base_url = config.api_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise SetupError(f"--api-url: an http:// or https:// URL, not {config.api_url!r}")
    run_id = secrets.token_hex(4)
    shares = split(plan, config.workers, run_id)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    fleet: Fleet | None = None
    if len(shares) > 1:
        from .distributed import Fleet  # the Ray shell, loaded for --workers alone

        fleet = await Fleet.start(config.ray_address, shares)
        if config.progress:
            nodes = len(set(fleet.nodes))
            out.write(f"{len(shares)} load generators on {nodes} node(s) of the Ray cluster\n")
    # Here the pool serves the load too; with a fleet only the setup and the cleanup.
    limit = connection_limit(plan) if fleet is None else SETUP_CONNECTIONS
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit)) as http:
            provisioned = await provision(
                http, base_url, config.api_key, plan, config.anthropic_key, run_id
            )
            try:
                results = await _apply(config, provisioned.target, shares, fleet, http, out)
            finally:
                for problem in await release(http, base_url, config.api_key, provisioned):
                    out.write(f"warning: cleanup: {problem}\n")
                out.flush()
    finally:
        if fleet is not None:
            fleet.stop()
    merged = merge(results)
    warnings = list(merged.client.warnings)
    limited = _rate_limit_warning(merged.rate_limited, merged.rate_limits_seen, provisioned)
    if limited is not None:
        warnings.append(limited)
    elapsed = merged.elapsed_s
    duration = max((o.end_s for o in merged.outcomes), default=elapsed)
    return build_report(
        merged.outcomes,
        config=run_config(plan),
        api_url=base_url,
        date=date,
        duration_s=duration if math.isfinite(duration) else elapsed,
        thresholds=config.thresholds,
        client=merged.client.model_copy(update={"warnings": warnings}),
        run_failures=merged.failures,
        started_at=merged.started_at,
    )


def run(config: LoadTestConfig, out: TextIO = sys.stderr) -> LoadTestReport:
    """``run_loadtest`` on a new event loop (the CLI's entry)."""
    return asyncio.run(run_loadtest(config, out))
