"""The pool policy's exhaustive grid: every decision over small pools, each side of every
threshold, in fresh and cooled-down states, checked against ``autoscaling/pool_policy.py``'s
documented invariants (the builders: ``pool_policy_cases.py``)."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import NamedTuple

import pytest

from autoscaling.pool_policy import (
    REASONS,
    Decision,
    Observation,
    PoolPolicy,
    PoolState,
    decide,
)

from .pool_policy_cases import (
    DOWN_REASONS,
    HOLD_REASONS,
    NOW,
    POLICIES,
    TICK_S,
    TOLERANCE,
    UP_REASONS,
    pool,
    projected,
    seen,
    util,
)

# The exhaustive grid: invariants of every decision


class Case(NamedTuple):
    policy: PoolPolicy
    state: PoolState
    seen: Observation
    now: float
    decision: Decision

    @property
    def demand(self) -> int:
        return self.seen.demand

    @property
    def counted(self) -> int:
        return self.seen.counted

    def __str__(self) -> str:
        p, d = self.policy, self.decision
        return (
            f"min={p.min_replicas} max={p.max_replicas} {self.seen} now={self.now} "
            f"{self.state} -> desired={d.desired} reason={d.reason}"
        )


def grid_states(policy: PoolPolicy, now: float) -> list[PoolState]:
    up_s, down_s = policy.scale_up_cooldown_s, policy.scale_down_cooldown_s
    blip = ((now - 3 * TICK_S, 0), (now - 2 * TICK_S, 0), (now - TICK_S, 1))
    ramp = ((now - 2 * TICK_S, 0), (now - TICK_S, policy.max_sessions))
    return [
        PoolState(),
        PoolState(last_up_at=now - up_s / 2),  # inside both cooldowns
        PoolState(last_up_at=now - up_s),  # the up cooldown just over
        PoolState(below_since=now - down_s / 2),  # below, for half a cooldown
        PoolState(below_since=now - down_s, last_up_at=now - down_s, last_down_at=now - down_s),
        PoolState(below_since=now - down_s, samples=blip),  # a small rise, gone now
        PoolState(below_since=now - 2 * down_s, samples=ramp),  # a steep rise
    ]


def edge_sessions(policy: PoolPolicy, counted: int) -> list[int]:
    """Sessions on and either side of every threshold of ``counted`` replicas, and beyond."""
    cap = counted * policy.max_sessions
    values = {0, 1, cap, cap + 1, (policy.max_replicas + 2) * policy.max_sessions}
    for threshold in (policy.scale_down_at, policy.settle_at, policy.scale_up_at, policy.panic_at):
        x = threshold * cap  # below, on (when whole) and above the edge
        values.update({math.ceil(x - TOLERANCE) - 1, round(x), math.floor(x + TOLERANCE) + 1})
    return sorted(v for v in values if v >= 0)


def grid_bounds() -> Iterator[tuple[int, int]]:
    for lo in range(4):
        for hi in [*range(lo, 7), 1000]:
            yield lo, hi


@functools.cache
def grid(name: str) -> tuple[Case, ...]:
    cases = []
    for lo, hi in grid_bounds():
        policy = pool(POLICIES[name], lo, hi)
        counts = range(min(hi + 2, 9))  # under min, each size up to max, and over it
        for state, counted in itertools.product(grid_states(policy, NOW), counts):
            ready = min(counted, 8)  # decide sees only ready + starting (tested on its own)
            # Turns in flight count as demand exactly as sessions do (tested on their own);
            # refusals only matter to the up branch, whose cooldowns the first states cover.
            refusals = (0, 1) if state.below_since is None else (0,)
            for s, refused in itertools.product(edge_sessions(policy, counted), refusals):
                observation = seen(s, ready=ready, starting=counted - ready, refused=refused)
                decision = decide(policy, state, observation, NOW)
                cases.append(Case(policy, state, observation, NOW, decision))
    return tuple(cases)


def assert_all(cases: Sequence[Case], broken: Callable[[Case], str | None]) -> None:
    """Fail with the number of cases that break an invariant, and the first few of them."""
    failures = [f"{case}: {why}" for case in cases if (why := broken(case))]
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:5])


grid_policies = pytest.mark.parametrize("name", list(POLICIES))


@grid_policies
def test_grid_desired_stays_within_min_and_max(name: str) -> None:
    def broken(c: Case) -> str | None:
        p = c.policy
        ok = p.min_replicas <= c.decision.desired <= p.max_replicas
        return None if ok else "desired outside [min, max]"

    assert_all(grid(name), broken)


@grid_policies
def test_grid_reason_is_known_and_agrees_with_the_change(name: str) -> None:
    def broken(c: Case) -> str | None:
        d = c.decision
        if d.reason not in REASONS:
            return "unknown reason"
        if d.counted != c.counted or d.state.desired != d.desired:
            return "decision does not record its counted and desired"
        direction = (d.delta > 0) - (d.delta < 0)
        want = 1 if d.reason in UP_REASONS else -1 if d.reason in DOWN_REASONS else 0
        return None if direction == want else f"delta {d.delta} for reason {d.reason}"

    assert_all(grid(name), broken)


@grid_policies
def test_grid_scales_up_only_for_load_refusals_or_below_min(name: str) -> None:
    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if d.delta <= 0 or c.counted < p.min_replicas:
            return None
        ahead = projected(p, d, c.demand)
        load = max(util(p, c.demand, c.counted), util(p, ahead, c.counted)) > p.scale_up_at
        if not (load or c.seen.refused):
            return "scaled up with utilisation at or under scale_up_at and nothing refused"
        if d.state.last_up_at != c.now:
            return "a scale-up not recorded in last_up_at"
        since_up_s = math.inf if c.state.last_up_at is None else c.now - c.state.last_up_at
        if not c.seen.refused and since_up_s < p.scale_up_cooldown_s:
            return "scaled up within scale_up_cooldown_s without refusals"
        return None

    assert_all(grid(name), broken)


@grid_policies
def test_grid_a_scale_up_brings_demand_under_scale_up_at_unless_capped(name: str) -> None:
    """Up makes desired "the fewest replicas that bring demand back under scale_up_at": unless
    the step is capped by ``max_replicas`` or ``max_step``, the new pool holds the demand (and
    its projection) at or under the threshold. Scaling up to ``min_replicas`` is a scale-up too."""

    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if d.delta <= 0 or d.desired == p.max_replicas or d.delta >= p.max_step:
            return None
        load = max(c.demand, projected(p, d, c.demand))
        if util(p, load, d.desired) > p.scale_up_at * (1 + TOLERANCE):
            return f"demand {load:.1f} over {d.desired} replicas is above scale_up_at"
        return None

    assert_all(grid(name), broken)


@grid_policies
def test_grid_a_plain_scale_up_adds_the_fewest_replicas(name: str) -> None:
    """Not aggressive (no refusal, panic or surge) and more than the one replica every up adds:
    one replica fewer would leave the demand or its projection above ``scale_up_at``."""

    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if d.reason not in {"utilisation", "trend"} or d.delta <= 1:
            return None
        load = max(c.demand, projected(p, d, c.demand))
        if util(p, load, d.desired - 1) <= p.scale_up_at:
            return f"{d.desired - 1} replicas already hold {load:.1f} under scale_up_at"
        return None

    assert_all(grid(name), broken)


@grid_policies
def test_grid_an_up_step_adds_at_most_max_step(name: str) -> None:
    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if c.counted < p.min_replicas:  # the floor is not a step
            return None
        return f"added {d.delta} > max_step" if d.delta > p.max_step else None

    assert_all(grid(name), broken)


@grid_policies
def test_grid_refusals_at_least_double_the_pool(name: str) -> None:
    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if not c.seen.refused or not p.min_replicas <= c.counted <= p.max_replicas:
            return None
        if c.seen.starting:  # callers report refusals only while no replica starts
            return None
        doubled = min(max(2 * c.counted, 1), c.counted + p.max_step, p.max_replicas)
        return None if d.desired >= doubled else f"refusals gave {d.desired} < {doubled}"

    assert_all(grid(name), broken)


@grid_policies
def test_grid_scales_down_only_below_scale_down_at_after_both_cooldowns(name: str) -> None:
    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if d.delta >= 0 or d.reason == "above_max":  # the bound is not a step
            return None
        if c.counted <= p.min_replicas:
            return "stepped down at or below min"
        ahead = projected(p, d, c.demand)
        if max(util(p, c.demand, c.counted), util(p, ahead, c.counted)) >= p.scale_down_at:
            return "stepped down with utilisation at or above scale_down_at"
        cooldown_s = p.scale_down_cooldown_s
        if c.state.below_since is None or c.now - c.state.below_since < cooldown_s:
            return "stepped down before a whole scale_down_cooldown_s below the band"
        if c.state.last_up_at is not None and c.now - c.state.last_up_at < cooldown_s:
            return "stepped down within scale_down_cooldown_s of a scale-up"
        if d.state.last_down_at != c.now or d.state.below_since is not None:
            return "a step down must record last_down_at and restart below_since"
        return None

    assert_all(grid(name), broken)


@grid_policies
def test_grid_a_step_down_is_bounded_and_lands_inside_the_band(name: str) -> None:
    """One step removes at most ``max(1, floor(counted x down_step))`` replicas, goes as far as
    ``settle_at`` within that, and leaves utilisation at or under ``settle_at`` (so under
    ``scale_up_at``: the hysteresis)."""

    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if d.delta >= 0 or d.reason == "above_max":
            return None
        step = max(1, math.floor(c.counted * p.down_step))
        if -d.delta > step:
            return f"removed {-d.delta} > {step}"
        if util(p, c.demand, d.desired) > p.settle_at * (1 + TOLERANCE):
            return "a step down put utilisation above settle_at"
        bounded = -d.delta == step or d.desired == p.min_replicas
        load = max(c.demand, projected(p, d, c.demand))
        if not bounded and util(p, load, d.desired - 1) <= p.settle_at:
            return "stopped short of settle_at with neither down_step nor min in the way"
        return None

    assert_all(grid(name), broken)


@grid_policies
def test_grid_a_step_down_leaves_the_projection_under_scale_up_at(name: str) -> None:
    """Up acts on the projected demand as well as the demand, so the hysteresis must hold for
    both: a step down that lands the projection above ``scale_up_at`` is undone next tick."""

    def broken(c: Case) -> str | None:
        p, d = c.policy, c.decision
        if d.delta >= 0 or d.reason == "above_max":
            return None
        ahead = projected(p, d, c.demand)
        if util(p, ahead, d.desired) > p.scale_up_at:
            return f"projected demand {ahead:.2f} over {d.desired} replicas is above scale_up_at"
        return None

    assert_all(grid(name), broken)


@grid_policies
def test_grid_holds_keep_the_pool_and_record_the_sample(name: str) -> None:
    def broken(c: Case) -> str | None:
        d = c.decision
        if d.state.samples[-1] != (c.now, c.demand):
            return "the observation's demand is not the newest sample"
        if d.reason in HOLD_REASONS and d.desired != c.counted:
            return "a hold changed the pool"
        return None

    assert_all(grid(name), broken)


@grid_policies
def test_the_same_inputs_give_the_same_decision_and_are_left_as_they_were(name: str) -> None:
    for case in grid(name)[::97]:
        state, observation = replace(case.state), replace(case.seen)
        again = decide(case.policy, case.state, case.seen, case.now)
        assert again == case.decision, case
        assert (case.state, case.seen) == (state, observation)
