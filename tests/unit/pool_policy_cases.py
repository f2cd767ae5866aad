"""The builders the pool policy's unit tests share (``test_pool_policy*.py``): the two
parameter sets every invariant is checked on, observations, and a few derived numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from autoscaling.pool_policy import (
    REASONS,
    Decision,
    Observation,
    PoolPolicy,
    PoolState,
    decide,
    trend_per_s,
)

# Builders


# The operator's defaults, and a policy with every field moved off them (small pools, small
# steps, short cooldowns) so the invariants are checked where the integer rounding bites.
DEFAULT = PoolPolicy()
TIGHT = PoolPolicy(
    max_sessions=4,
    scale_up_at=0.75,
    scale_down_at=0.25,
    panic_at=0.9,
    max_step=2,
    down_step=0.34,
    scale_up_cooldown_s=10.0,
    scale_down_cooldown_s=60.0,
    trend_window_s=30.0,
    lead_time_s=4.0,
)
POLICIES = {"default": DEFAULT, "tight": TIGHT}
NOW = 10_000.0
TICK_S = 2.0  # the pool controller's tick
TOLERANCE = 1e-9  # ``replicas_for``'s own hair of tolerance at a threshold

UP_REASONS = {"below_min", "utilisation", "trend", "panic", "surge", "refused"}
DOWN_REASONS = {"above_max", "utilisation_low"}
HOLD_REASONS = set(REASONS) - UP_REASONS - DOWN_REASONS


def pool(base: PoolPolicy = DEFAULT, lo: int = 1, hi: int = 1000, **fields: Any) -> PoolPolicy:
    """``base`` with ``lo..hi`` replicas and any other fields replaced."""
    return replace(base, min_replicas=lo, max_replicas=hi, **fields)


def seen(
    sessions: int = 0, *, ready: int = 0, starting: int = 0, busy: int = 0, refused: int = 0
) -> Observation:
    return Observation(
        sessions=sessions, busy=busy, refused=refused, ready=ready, starting=starting
    )


def util(policy: PoolPolicy, demand: float, replicas: int) -> float:
    """Demand over the capacity of ``replicas`` (infinite for demand on no replicas)."""
    if replicas == 0:
        return math.inf if demand else 0.0
    return demand / (replicas * policy.max_sessions)


def projected(policy: PoolPolicy, decision: Decision, demand: int) -> float:
    """The demand the decision saw ``lead_time_s`` ahead (its kept samples hold the trend)."""
    return demand + max(0.0, trend_per_s(decision.state.samples)) * policy.lead_time_s


def exact_capacity(policy: PoolPolicy, *thresholds: float) -> int:
    """The fewest replicas whose capacity puts each threshold on a whole number of sessions, so a
    test can sit exactly on an edge."""
    for replicas in range(1, 10_001):
        cap = replicas * policy.max_sessions
        if all(abs(th * cap - round(th * cap)) < 1e-9 for th in thresholds):
            return replicas
    raise AssertionError(f"no capacity puts {thresholds} on whole sessions")


def sessions_at(policy: PoolPolicy, replicas: int, threshold: float) -> int:
    return round(threshold * replicas * policy.max_sessions)


def run_ticks(
    policy: PoolPolicy,
    observations: Sequence[Observation],
    *,
    state: PoolState | None = None,
    start: float = NOW,
) -> list[Decision]:
    """Feed one observation per tick, threading the state through."""
    decisions = []
    state = PoolState() if state is None else state
    for i, observation in enumerate(observations):
        decision = decide(policy, state, observation, start + i * TICK_S)
        decisions.append(decision)
        state = decision.state
    return decisions
