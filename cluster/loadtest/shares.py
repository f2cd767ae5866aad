"""One run's load split across N generators (``--workers N``), and their results merged back.

The split: users as evenly as possible (the first ``users % N`` generators run one more);
each generator its own seed, derived from ``--seed`` and its index, so no two draw the same
think times, arrivals or tool calls and a rerun draws the same again; in an open loop each
its share of ``--rate`` in proportion to its users, so all of them finish arriving at the
same expected time, and the sum of their Poisson arrivals is a Poisson process at ``--rate``
(with ``--duration`` the users do not bound arrivals, and the rate is split evenly). Each
generator's idempotency keys carry its own run id. With one generator the plan is the run's
own, unchanged.

The merge: every generator's outcomes on the run's common clock, its CPU seconds summed,
the event-loop lag's percentiles over every generator's samples, its warnings prefixed with
its index, and a generator that failed named as a failure of the run, with what the others
measured still reported.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .generator import GeneratorResult, Share
from .report import ClientStats, Outcome, percentile
from .users import CLOSE_TIMEOUT_S, FAILED_OPEN_PAUSE_S, RETRY_AFTER_MAX_S, Plan

MAX_WORKERS = 256
# A generator that began more than this after the common start is named in a warning.
START_LATE_WARN_S = 0.5
# How many mean think times bound one think time in ``run_bound_s`` (exponential: e^-20).
THINK_TIME_BOUND = 20.0
# Slack for the Poisson arrivals in ``run_bound_s``: this many standard deviations.
ARRIVALS_BOUND_SD = 10.0
RUN_BOUND_SLACK_S = 60.0


def worker_seed(seed: int, index: int) -> int:
    """Generator ``index``'s seed: derived from ``--seed``, distinct per generator, the same in
    every run with that seed."""
    digest = hashlib.blake2b(f"hyperfleet-loadtest/{seed}/{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


def split(plan: Plan, workers: int, run_id: str) -> list[Share]:
    """``plan`` as ``workers`` shares (see the module's docstring).

    Raises:
        ValueError: ``workers`` out of range, worded for the flag.
    """
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers: 1 to {MAX_WORKERS}")
    if workers == 1:
        return [Share(0, plan, run_id)]
    arrivals_timed = plan.rate is not None and plan.duration_s is not None
    if workers > plan.users and not arrivals_timed:
        raise ValueError(
            f"--workers: at most --users ({plan.users}); each generator runs one user at least"
        )
    base, extra = divmod(plan.users, workers)
    shares = []
    for index in range(workers):
        users = base + (index < extra)
        rate = plan.rate
        if rate is not None:
            rate = rate / workers if arrivals_timed else rate * users / plan.users
        share = replace(plan, users=max(1, users), rate=rate, seed=worker_seed(plan.seed, index))
        shares.append(Share(index, share, f"{run_id}-{index}"))
    return shares


def request_bound_s(plan: Plan) -> float:
    """The longest one request can take: every attempt to its ``--timeout``, every retry after
    the longest ``Retry-After`` a client honours."""
    return (plan.max_retries + 1) * plan.timeout_s + plan.max_retries * RETRY_AFTER_MAX_S


def run_bound_s(plan: Plan) -> float:
    """A bound on how long a generator running (a share of) ``plan`` can take, should every
    request take its worst (``request_bound_s``) and every think time 20 times its mean: the
    deadline past which the driver stops waiting for a generator."""
    think_s = THINK_TIME_BOUND * plan.think_time_s
    session_s = (
        (plan.requests + 1) * request_bound_s(plan)
        + plan.requests * think_s
        + CLOSE_TIMEOUT_S
        + FAILED_OPEN_PAUSE_S
    )
    if plan.duration_s is not None:
        start_s = plan.duration_s + think_s
    elif plan.rate is not None:
        users = plan.users
        start_s = (users + ARRIVALS_BOUND_SD * math.sqrt(users) + ARRIVALS_BOUND_SD) / plan.rate
    else:
        start_s = 0.0
    return plan.ramp_up_s + start_s + session_s + RUN_BOUND_SLACK_S


@dataclass(frozen=True)
class Merged:
    """The generators' results as one run: what the report is built from."""

    outcomes: list[Outcome]
    # From the common start to the last generator's end.
    elapsed_s: float
    # The common start, ``time.time()``: the zero of the outcomes' times (0 when none ran).
    started_at: float
    client: ClientStats
    rate_limited: int
    rate_limits_seen: frozenset[int]
    # Each generator that failed, worded for a person: the run fails with these.
    failures: list[str]


def merge(results: Sequence[GeneratorResult]) -> Merged:
    """One run from its generators' results (in any order)."""
    several = len(results) > 1
    outcomes: list[Outcome] = []
    lags: list[float] = []
    warnings: list[str] = []
    failures: list[str] = []
    measured = [r for r in results if r.error is None]
    for r in sorted(results, key=lambda r: r.index):
        prefix = f"worker {r.index}: " if several else ""
        if r.error is not None:
            where = f" on node {r.node}" if r.node else ""
            failures.append(
                f"load generator {r.index} of {len(results)} failed{where}: {r.error} "
                "(its requests are missing from this report)"
            )
            continue
        outcomes.extend(r.outcomes.decode(r.late_s))
        lags.extend(r.lags_ms)
        if r.late_s > START_LATE_WARN_S:
            warnings.append(
                f"{prefix}started {r.late_s:.1f} s after the common start (its times are "
                "moved onto it; its first seconds overlap the others' less)"
            )
        warnings.extend(prefix + w for w in r.warnings)
    client = ClientStats(
        processes=len(results),
        cpu_s=round(sum(r.cpu_s for r in measured), 3),
        # Saturation is per process: the busiest one is the one to read.
        cpu_percent=round(max((r.cpu_percent for r in measured), default=0.0), 1),
        loop_lag_p99_ms=round(percentile(lags, 99) or 0.0, 3),
        loop_lag_max_ms=round(max(lags, default=0.0), 3),
        dropped_arrivals=sum(r.dropped_arrivals for r in measured),
        warnings=warnings,
    )
    return Merged(
        outcomes=outcomes,
        elapsed_s=max((r.late_s + r.elapsed_s for r in measured), default=0.0),
        started_at=min((r.started_at - r.late_s for r in measured), default=0.0),
        client=client,
        rate_limited=sum(r.rate_limited for r in measured),
        rate_limits_seen=frozenset().union(*(r.rate_limits_seen for r in measured)),
        failures=failures,
    )
