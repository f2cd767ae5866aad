"""The agent pool's scaling decision (``autoscaling/pool_policy.decide``), swept as a unit.

Written in the manner of Ray Serve's ``tests/unit/test_autoscaling_policy.py``: the policy is a
pure function, so the tests feed it observations on a fake clock and read the decision back. Every
expected number is derived from the policy's own fields (thresholds, cooldowns, steps), never
copied from today's defaults, so retuning the defaults keeps these tests meaningful.

Groups: an exhaustive grid of small pools checked against the module docstring's invariants;
cooldowns; aggressive steps; the trend; purity and the state's JSON round trip; closed-loop
simulations with seeded demand and a tiny fleet model (seeds are printed on failure); edge cases.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import pytest

from autoscaling.pool_policy import (
    REASONS,
    TREND_SAMPLES_MAX,
    Decision,
    Observation,
    PoolPolicy,
    PoolState,
    decide,
    replicas_for,
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


# Cooldowns


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
@pytest.mark.parametrize("share", [0.0, 0.5, 0.99])
def test_no_scale_down_within_scale_down_cooldown_s_of_a_scale_up(
    policy: PoolPolicy, share: float
) -> None:
    policy = pool(policy, 1, 20)
    cooldown_s = policy.scale_down_cooldown_s
    state = PoolState(last_up_at=NOW - share * cooldown_s, below_since=NOW - 2 * cooldown_s)
    held = decide(policy, state, seen(0, ready=10), NOW)
    assert (held.desired, held.reason) == (10, "down_cooldown")
    state = replace(state, last_up_at=NOW - cooldown_s)
    assert decide(policy, state, seen(0, ready=10), NOW).reason == "utilisation_low"


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_a_scale_down_waits_a_whole_cooldown_below_scale_down_at(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 20)
    ticks = math.ceil(policy.scale_down_cooldown_s / TICK_S) + 2
    decisions = run_ticks(policy, [seen(0, ready=10)] * ticks)
    first_down = next(i for i, d in enumerate(decisions) if d.delta < 0)
    assert first_down * TICK_S >= policy.scale_down_cooldown_s
    assert (first_down - 1) * TICK_S < policy.scale_down_cooldown_s
    assert {d.reason for d in decisions[:first_down]} == {"down_cooldown"}


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_below_since_restarts_when_utilisation_returns_to_the_band(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 20)
    ready = 10
    in_band = sessions_at(policy, ready, policy.settle_at)
    low = seen(0, ready=ready)
    almost = math.ceil(policy.scale_down_cooldown_s / TICK_S) - 1
    decisions = run_ticks(policy, [low] * almost + [seen(in_band, ready=ready)] + [low] * 2)
    assert decisions[0].state.below_since == NOW
    assert decisions[almost].reason == "steady"
    assert decisions[almost].state.below_since is None
    restart = NOW + (almost + 1) * TICK_S
    assert decisions[-1].state.below_since == restart
    assert decisions[-1].reason == "down_cooldown"


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_the_next_step_down_waits_another_whole_cooldown(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 20)
    cooldown_s = policy.scale_down_cooldown_s
    first = decide(policy, PoolState(below_since=NOW - cooldown_s), seen(0, ready=16), NOW)
    assert first.reason == "utilisation_low"
    after = [seen(0, ready=first.desired)] * (math.ceil(cooldown_s / TICK_S) + 2)
    decisions = run_ticks(policy, after, state=first.state, start=NOW + TICK_S)
    next_down = next(i for i, d in enumerate(decisions) if d.delta < 0)
    assert next_down * TICK_S >= cooldown_s
    assert (next_down - 1) * TICK_S < cooldown_s


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_the_up_cooldown_holds_a_second_scale_up(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 1000)
    ready = 4
    hot = seen(sessions_at(policy, ready, policy.scale_up_at) + 1, ready=ready)
    state = PoolState(last_up_at=NOW - policy.scale_up_cooldown_s + 0.001)
    held = decide(policy, state, hot, NOW)
    assert (held.desired, held.reason) == (ready, "up_cooldown")
    assert held.state.last_up_at == state.last_up_at
    over = decide(policy, replace(state, last_up_at=NOW - policy.scale_up_cooldown_s), hot, NOW)
    assert over.delta > 0


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_refusals_skip_the_up_cooldown(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 1000)
    state = PoolState(last_up_at=NOW - 0.001)
    decision = decide(policy, state, seen(4 * policy.max_sessions, ready=4, refused=1), NOW)
    assert decision.reason == "refused" and decision.delta > 0


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_refusals_while_replicas_start_do_not_double_again(policy: PoolPolicy) -> None:
    """A burst refused on every tick of a VM's start must not double the pool each tick."""
    policy = pool(policy, 1, 1000)
    state = PoolState(last_up_at=NOW - 0.001)
    full = 4 * policy.max_sessions
    decision = decide(policy, state, seen(full, ready=4, starting=4, refused=1), NOW)
    assert decision.reason != "refused" and decision.desired == 8  # the 4 on their way suffice
    many = full + 5 * policy.max_sessions  # more refused than the starting replicas hold
    later = replace(state, last_up_at=NOW - policy.scale_up_cooldown_s)
    bigger = decide(policy, later, seen(full, ready=4, starting=4, refused=many - full), NOW)
    needed = min(replicas_for(many, policy.max_sessions, policy.scale_up_at), 8 + policy.max_step)
    assert needed <= bigger.desired <= max(needed, min(2 * 8, 8 + policy.max_step))


def test_refused_sessions_count_as_demand() -> None:
    assert seen(10, busy=3, refused=4).demand == 14
    assert seen(2, busy=5, refused=1).demand == 6


# Aggressive steps


@pytest.mark.parametrize("max_step", [1, 3, 1000])
@pytest.mark.parametrize("counted", [0, 1, 2, 5, 40])
def test_refusals_double_the_pool_bounded_by_max_step(counted: int, max_step: int) -> None:
    policy = pool(DEFAULT, 0, 1000, max_step=max_step)
    decision = decide(policy, PoolState(), seen(0, ready=counted, refused=1), NOW)
    assert decision.reason == "refused"
    assert decision.desired == min(max(2 * counted, 1), counted + max_step)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_panic_at_or_above_panic_at_at_least_doubles(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 1000, max_step=1000)
    ready = exact_capacity(policy, policy.panic_at)
    ready *= math.ceil(10 / ready)  # enough room between scale_up_at and panic_at
    at_panic = sessions_at(policy, ready, policy.panic_at)
    for sessions in (at_panic, at_panic + 1, ready * policy.max_sessions):
        decision = decide(policy, PoolState(), seen(sessions, ready=ready), NOW)
        assert decision.reason == "panic", sessions
        assert decision.desired >= 2 * ready, sessions
    below = decide(policy, PoolState(), seen(at_panic - 1, ready=ready), NOW)
    assert below.reason == "utilisation"
    assert below.desired == replicas_for(at_panic - 1, policy.max_sessions, policy.scale_up_at)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
@pytest.mark.parametrize("refused", [0, 1])
def test_max_step_bounds_an_up_step_however_high_the_demand(
    policy: PoolPolicy, refused: int
) -> None:
    policy = pool(policy, 1, 10_000)
    for ready in (1, 10, 100):
        flood = seen(1000 * ready * policy.max_sessions, ready=ready, refused=refused)
        decision = decide(policy, PoolState(), flood, NOW)
        assert decision.desired == min(ready + policy.max_step, policy.max_replicas), ready


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_turns_in_flight_count_as_demand(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 1000)
    hot = sessions_at(policy, 4, policy.scale_up_at) + 1
    by_busy = decide(policy, PoolState(), seen(0, busy=hot, ready=4), NOW)
    by_sessions = decide(policy, PoolState(), seen(hot, ready=4), NOW)
    assert by_busy.desired == by_sessions.desired > 4


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_exactly_at_scale_up_at_is_not_over_it(policy: PoolPolicy) -> None:
    policy = pool(policy, 1, 1000)
    ready = exact_capacity(policy, policy.scale_up_at)
    ready *= math.ceil(10 / ready)  # one more session stays under panic_at
    at = sessions_at(policy, ready, policy.scale_up_at)
    assert decide(policy, PoolState(), seen(at, ready=ready), NOW).reason == "steady"
    over = decide(policy, PoolState(), seen(at + 1, ready=ready), NOW)
    assert over.reason == "utilisation"
    assert over.desired == ready + 1 or util(policy, at + 1, over.desired) <= policy.scale_up_at


# The trend


@pytest.mark.parametrize("slope", [-3.5, 0.0, 0.25, 2.0, 40.0])
def test_trend_per_s_is_the_slope_of_linear_data(slope: float) -> None:
    samples = tuple((float(t), round(500 + slope * t)) for t in range(0, 120, 4))
    assert trend_per_s(samples) == pytest.approx(slope, abs=0.01)
    exact = tuple((float(t), 7 * t + 3) for t in range(10))
    assert trend_per_s(exact) == pytest.approx(7.0)


@pytest.mark.parametrize(
    "samples", [(), ((0.0, 1),), ((0.0, 1), (2.0, 9)), ((5.0, 1), (5.0, 9), (5.0, 20))]
)
def test_trend_per_s_is_zero_without_three_samples_spread_in_time(
    samples: tuple[tuple[float, int], ...],
) -> None:
    assert trend_per_s(samples) == 0.0


def ramp(policy: PoolPolicy, ready: int, rate_per_s: float) -> list[Decision]:
    """A pool of ``ready`` replicas under demand rising at ``rate_per_s`` from zero, until its
    first change."""
    decisions: list[Decision] = []
    state = PoolState()
    for i in range(10_000):
        now = NOW + i * TICK_S
        demand = math.floor(rate_per_s * i * TICK_S)
        decisions.append(decide(policy, state, seen(demand, ready=ready), now))
        state = decisions[-1].state
        if decisions[-1].delta:
            return decisions
    raise AssertionError("the ramp never changed the pool")


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
@pytest.mark.parametrize("lead_share", [0.25, 0.5])
def test_a_steady_ramp_scales_up_before_utilisation_crosses_scale_up_at(
    policy: PoolPolicy, lead_share: float
) -> None:
    """Demand rising fast enough to gain ``lead_share`` of the threshold within
    ``lead_time_s`` is met ahead of time: the pool grows while utilisation is still under
    ``scale_up_at``, once demand plus the projection crosses it."""
    policy = pool(policy, 1, 1000)
    ready = 10
    threshold = policy.scale_up_at * ready * policy.max_sessions
    rate = lead_share * threshold / policy.lead_time_s
    last = ramp(policy, ready, rate)[-1]
    demand = last.state.samples[-1][1]
    assert last.reason in {"trend", "surge"}
    assert util(policy, demand, ready) <= policy.scale_up_at
    ahead = demand + rate * policy.lead_time_s
    assert ahead > threshold * 0.95  # not far too early
    capped = last.desired == ready + policy.max_step
    assert capped or util(policy, ahead, last.desired) <= policy.scale_up_at * 1.05


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
@pytest.mark.parametrize("fall_per_tick", [0, 1, 5])
def test_a_flat_or_falling_series_does_not_scale_up(policy: PoolPolicy, fall_per_tick: int) -> None:
    """From the edge of ``scale_up_at``, flat or falling for a whole window: nothing is added."""
    policy = pool(policy, 1, 1000)
    ready = 10
    top = math.floor(policy.scale_up_at * ready * policy.max_sessions)
    n = math.ceil(policy.trend_window_s / TICK_S) + 2
    history = [seen(max(0, top - fall_per_tick * i), ready=ready) for i in range(n)]
    assert all(d.delta <= 0 for d in run_ticks(policy, history))


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_a_falling_trend_does_not_hold_back_a_scale_up(policy: PoolPolicy) -> None:
    """Only a rising trend moves the projection: falling demand still above ``scale_up_at``
    gets the replicas that demand needs now."""
    policy = pool(policy, 1, 1000, max_step=1000)
    ready = 10
    hot = math.floor(policy.scale_up_at * ready * policy.max_sessions) + 1
    falling = tuple((NOW - TICK_S * k, hot + 5 * k) for k in range(10, 0, -1))
    decision = decide(policy, PoolState(samples=falling), seen(hot, ready=ready), NOW)
    assert decision.reason in {"utilisation", "panic"}
    assert decision.desired >= replicas_for(hot, policy.max_sessions, policy.scale_up_at)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_a_projection_that_outruns_double_the_pool_is_a_surge(policy: PoolPolicy) -> None:
    """Demand still under ``scale_up_at`` but rising so fast that the projection needs more than
    twice the pool: aggressive, reason ``surge``, bounded by ``max_step``."""
    policy = pool(policy, 1, 1000)
    ready = 4
    cap = ready * policy.max_sessions
    now_demand = math.floor(policy.scale_up_at * cap)
    # Over lead_time_s demand gains 1.5 times itself: 2.5 times what scale_up_at allows.
    rate = 1.5 * now_demand / policy.lead_time_s
    spacing_s = now_demand / (3 * rate)  # three samples back to nothing, on the line
    steep = tuple(
        (NOW - spacing_s * k, round(now_demand - rate * spacing_s * k)) for k in (3, 2, 1)
    )
    decision = decide(policy, PoolState(samples=steep), seen(now_demand, ready=ready), NOW)
    assert decision.reason == "surge"
    assert decision.desired >= min(2 * ready, ready + policy.max_step)
    assert decision.delta <= policy.max_step


def test_the_window_drops_samples_older_than_trend_window_s() -> None:
    policy = pool(TIGHT, 1, 10)
    window_s = policy.trend_window_s
    old = ((NOW - window_s - 0.001, 99), (NOW - window_s, 5), (NOW - 1.0, 6))
    decision = decide(policy, PoolState(samples=old), seen(7, ready=2), NOW)
    assert decision.state.samples == ((NOW - window_s, 5), (NOW - 1.0, 6), (NOW, 7))


def test_the_window_keeps_at_most_trend_samples_max() -> None:
    policy = pool(DEFAULT, 1, 10)
    spacing_s = policy.trend_window_s / (3 * TREND_SAMPLES_MAX)
    many = tuple((NOW - k * spacing_s, k) for k in range(2 * TREND_SAMPLES_MAX, 0, -1))
    decision = decide(policy, PoolState(samples=many), seen(0, ready=1), NOW)
    assert len(decision.state.samples) == TREND_SAMPLES_MAX
    assert decision.state.samples[-1] == (NOW, 0)
    assert decision.state.samples[:-1] == many[-(TREND_SAMPLES_MAX - 1) :]


# Purity, and the state's round trip


@grid_policies
def test_the_same_inputs_give_the_same_decision_and_are_left_as_they_were(name: str) -> None:
    for case in grid(name)[::97]:
        state, observation = replace(case.state), replace(case.seen)
        again = decide(case.policy, case.state, case.seen, case.now)
        assert again == case.decision, case
        assert (case.state, case.seen) == (state, observation)


@pytest.mark.parametrize(
    "value", [PoolPolicy(), PoolState(), seen(1), Decision(1, "steady", PoolState(), 1)]
)
def test_inputs_and_decisions_are_frozen(value: object) -> None:
    name = dataclasses.fields(value)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, name, None)


def round_trip(state: PoolState) -> PoolState:
    return PoolState.from_json(json.loads(json.dumps(state.to_json())))


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_a_restarted_controller_makes_the_same_next_decision(policy: PoolPolicy) -> None:
    """The state stored as JSON at every tick of a busy run (ups, holds, cooldowns, a trend,
    steps down) decides the next tick exactly as the state kept in memory."""
    policy = pool(policy, 1, 100)
    demands = step_then_stop(policy, level=6, ticks=steps_to_settle(policy))
    ticks = simulate(policy, demands, ready=1)
    state = PoolState()
    reasons = set()
    for tick in ticks:
        restored = round_trip(state)
        assert restored == state
        live = decide(policy, state, tick.seen, tick.at_s)
        assert decide(policy, restored, tick.seen, tick.at_s) == live, tick
        reasons.add(live.reason)
        state = live.state
    assert {"refused", "down_cooldown", "utilisation_low"} <= reasons


# Closed loop: seeded demand, a tiny fleet, decide tick by tick


@dataclass
class Fleet:
    """Replicas as the controller sees them: starting ones become ready after ``start_ticks``;
    sessions beyond the ready capacity are refused, and reported as the module docstring asks
    of a caller, only while no replica is starting. A step down cancels starting replicas
    first, then drains ready ones (gone at once)."""

    ready: int
    start_ticks: int
    starting: list[int] = field(default_factory=list)  # ticks left for each starting replica

    def observe(self, demand: int, max_sessions: int) -> Observation:
        sessions = min(demand, self.ready * max_sessions)
        return Observation(
            sessions=sessions,
            busy=sessions // 2,
            refused=0 if self.starting else demand - sessions,
            ready=self.ready,
            starting=len(self.starting),
        )

    def apply(self, desired: int) -> None:
        counted = self.ready + len(self.starting)
        self.starting += [self.start_ticks] * max(0, desired - counted)
        for _ in range(counted - desired):
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1
        left = [t - 1 for t in self.starting]
        self.ready += sum(1 for t in left if t <= 0)
        self.starting = [t for t in left if t > 0]


@dataclass(frozen=True)
class Tick:
    at_s: float
    demand: int  # sessions wanted, refused ones included
    seen: Observation
    decision: Decision


def simulate(policy: PoolPolicy, demands: Sequence[int], *, ready: int) -> list[Tick]:
    """Drive ``decide`` one tick per demand; new replicas take ``lead_time_s`` to be ready."""
    fleet = Fleet(ready, start_ticks=max(1, math.ceil(policy.lead_time_s / TICK_S)))
    state = PoolState()
    ticks = []
    for i, demand in enumerate(demands):
        observation = fleet.observe(demand, policy.max_sessions)
        decision = decide(policy, state, observation, i * TICK_S)
        ticks.append(Tick(i * TICK_S, demand, observation, decision))
        state = decision.state
        fleet.apply(decision.desired)
    return ticks


def flaps(policy: PoolPolicy, ticks: Sequence[Tick]) -> list[str]:
    """An up then a down within ``scale_down_cooldown_s``; or a down then an up within it while
    demand rose by less than the band allows (from ``settle_at`` to ``scale_up_at``)."""
    cooldown_s = policy.scale_down_cooldown_s
    band = policy.scale_up_at / policy.settle_at
    found = []
    last_up: Tick | None = None
    last_down: tuple[int, Tick] | None = None
    for i, tick in enumerate(ticks):
        delta = tick.decision.delta
        if delta < 0:
            if last_up is not None and tick.at_s - last_up.at_s < cooldown_s:
                found.append(f"down at {tick.at_s}s, {tick.at_s - last_up.at_s}s after an up")
            last_down = (i, tick)
        elif delta > 0:
            if last_down is not None and tick.at_s - last_down[1].at_s < cooldown_s:
                rise = max(t.demand for t in ticks[last_down[0] : i + 1])
                if rise <= last_down[1].demand * band:
                    found.append(
                        f"up at {tick.at_s}s ({tick.decision.reason}), "
                        f"{tick.at_s - last_down[1].at_s}s after a down, "
                        f"demand {last_down[1].demand} -> at most {rise}"
                    )
            last_up = tick
    return found


def unwaited_downs(policy: PoolPolicy, ticks: Sequence[Tick]) -> list[str]:
    """Steps down not preceded by a whole ``scale_down_cooldown_s`` below ``scale_down_at`` with
    no other change of the pool."""
    found = []
    for i, tick in enumerate(ticks):
        if tick.decision.delta >= 0:
            continue
        window = [t for t in ticks[:i] if tick.at_s - t.at_s < policy.scale_down_cooldown_s]
        if tick.at_s - ticks[0].at_s < policy.scale_down_cooldown_s:
            found.append(f"down at {tick.at_s}s, before a whole cooldown had passed")
        elif any(
            t.decision.delta or util(policy, t.seen.demand, t.seen.counted) >= policy.scale_down_at
            for t in window
        ):
            found.append(f"down at {tick.at_s}s, within a cooldown of a change or of load")
    return found


def random_walk(seed: int, n: int, step: int, hi: int) -> list[int]:
    """``n`` demands in ``0..hi``, from a seeded start, each within ``step`` of the last."""
    rng = random.Random(seed)
    demands, demand = [], rng.randrange(hi + 1)
    for _ in range(n):
        demand = min(hi, max(0, demand + rng.randint(-step, step)))
        demands.append(demand)
    return demands


def steps_to_settle(policy: PoolPolicy) -> int:
    """Ticks for three whole down cooldowns: room for a rise, a settle and steps down."""
    return 3 * math.ceil(policy.scale_down_cooldown_s / TICK_S)


def step_then_stop(policy: PoolPolicy, level: float, ticks: int) -> list[int]:
    """Nothing, then ``level`` replicas' worth of sessions, then nothing again."""
    demand = round(level * policy.max_sessions)
    quiet = [0] * 5
    return quiet + [demand] * ticks + [0] * ticks


CLOSED_LOOP = [
    pytest.param(pool(DEFAULT, 1, 50), id="default"),
    pytest.param(pool(TIGHT, 1, 50), id="tight"),
    pytest.param(pool(DEFAULT, 0, 50), id="default-min0"),
]


@pytest.mark.parametrize("policy", CLOSED_LOOP)
@pytest.mark.parametrize("level", [0.0, 0.3, 0.8, 2.5, 7.2])
@pytest.mark.parametrize("ready", [1, 12])
def test_constant_demand_never_flaps(policy: PoolPolicy, level: float, ready: int) -> None:
    demand = round(level * policy.max_sessions)
    ticks = simulate(policy, [demand] * steps_to_settle(policy), ready=ready)
    assert flaps(policy, ticks) == []
    assert unwaited_downs(policy, ticks) == []
    final = ticks[-1].decision
    assert util(policy, demand, final.desired) <= policy.scale_up_at


@pytest.mark.parametrize("policy", CLOSED_LOOP)
@pytest.mark.parametrize("seed", range(6))
def test_a_random_walk_of_demand_never_flaps(policy: PoolPolicy, seed: int) -> None:
    ms = policy.max_sessions
    demands = random_walk(seed, 2 * steps_to_settle(policy), step=max(1, ms // 25), hi=20 * ms)
    found = flaps(policy, simulate(policy, demands, ready=policy.min_replicas))
    assert found == [], f"seed={seed}: {found[:3]}"


@pytest.mark.parametrize("policy", CLOSED_LOOP)
@pytest.mark.parametrize("seed", range(4))
def test_a_slow_drift_never_flaps(policy: PoolPolicy, seed: int) -> None:
    """Demand drifting up then down over the run, with a little noise."""
    rng = random.Random(seed)
    ms = policy.max_sessions
    n = 2 * steps_to_settle(policy)
    peak = rng.uniform(2, 15) * ms
    demands = [
        max(0, round(peak * (1 - abs(2 * i / n - 1)) + rng.gauss(0, ms / 50))) for i in range(n)
    ]
    found = flaps(policy, simulate(policy, demands, ready=policy.min_replicas))
    assert found == [], f"seed={seed}: {found[:3]}"


@pytest.mark.parametrize("policy", CLOSED_LOOP)
@pytest.mark.parametrize("seed", range(4))
def test_sparse_demand_near_zero_never_flaps(policy: PoolPolicy, seed: int) -> None:
    """A session now and then on an idle pool (a pool at min 0 is where the trend bites)."""
    rng = random.Random(seed)
    demands = [1 if rng.random() < 0.02 else 0 for _ in range(steps_to_settle(policy))]
    found = flaps(policy, simulate(policy, demands, ready=policy.min_replicas))
    assert found == [], f"seed={seed}: {found[:3]}"


def up_bound_ticks(policy: PoolPolicy, needed: int) -> int:
    """Doubling to ``needed`` (``max_step`` at a time), each doubling waiting for a start at
    worst, then two up cooldowns."""
    start = math.ceil(policy.lead_time_s / TICK_S)
    doublings = math.ceil(math.log2(max(needed, 1))) + math.ceil(needed / policy.max_step)
    cooldowns = 2 * (math.ceil(policy.scale_up_cooldown_s / TICK_S) + start)
    return doublings * (start + 1) + cooldowns + 2


@pytest.mark.parametrize("policy", CLOSED_LOOP)
@pytest.mark.parametrize("level", [0.5, 3.0, 9.7, 30.0])
def test_a_step_increase_is_served_within_bounded_ticks(policy: PoolPolicy, level: float) -> None:
    demand = round(level * policy.max_sessions)
    needed = min(replicas_for(demand, policy.max_sessions, policy.scale_up_at), policy.max_replicas)
    bound = up_bound_ticks(policy, needed)
    ticks = simulate(policy, [0] * 5 + [demand] * (bound + 30), ready=policy.min_replicas)[5:]
    served = next(i for i, t in enumerate(ticks) if not t.seen.refused and t.seen.ready >= needed)
    assert served <= bound, f"served after {served} ticks"
    assert all(not t.seen.refused for t in ticks[served:])


@pytest.mark.parametrize("policy", CLOSED_LOOP)
@pytest.mark.parametrize("level", [3.0, 9.7])
def test_a_step_increase_at_most_doubles_what_demand_needs(
    policy: PoolPolicy, level: float
) -> None:
    """A replica on its way "is capacity already asked for, so a tick does not ask again while
    it starts", and callers report refusals only while none is starting: a burst of refusals
    doubles the pool once per start, not once per tick, so the pool stays within twice what the
    demand needs."""
    demand = round(level * policy.max_sessions)
    needed = replicas_for(demand, policy.max_sessions, policy.scale_up_at)
    ticks = simulate(policy, step_then_stop(policy, level, 200), ready=policy.min_replicas)
    largest = max(t.decision.desired for t in ticks)
    trace = [(t.at_s, t.seen.ready, t.seen.starting, t.decision.desired) for t in ticks[5:12]]
    assert largest <= max(2 * needed, policy.min_replicas), (
        f"demand needs {needed}, the pool went to {largest}; (s, ready, starting, desired): {trace}"
    )


def down_steps(policy: PoolPolicy, counted: int) -> int:
    """Steps from ``counted`` to ``min_replicas`` with no demand, one ``down_step`` each."""
    steps = 0
    while counted > policy.min_replicas:
        counted = max(policy.min_replicas, counted - max(1, math.floor(counted * policy.down_step)))
        steps += 1
    return steps


@pytest.mark.parametrize("policy", CLOSED_LOOP)
def test_the_pool_returns_to_min_after_demand_ends(policy: PoolPolicy) -> None:
    """Nothing for a whole cooldown, then one step per cooldown, down to ``min_replicas``."""
    level = 4.0
    cooldown_ticks = math.ceil(policy.scale_down_cooldown_s / TICK_S)
    busy = steps_to_settle(policy)
    idle = (down_steps(policy, policy.max_replicas) + 1) * (cooldown_ticks + 1)
    demands = step_then_stop(policy, level, busy)[: 5 + busy] + [0] * idle
    ticks = simulate(policy, demands, ready=policy.min_replicas)
    after = ticks[5 + busy :]
    at_end = after[0].decision.counted
    assert at_end > policy.min_replicas
    assert unwaited_downs(policy, ticks) == []
    reached = next(i for i, t in enumerate(after) if t.decision.desired == policy.min_replicas)
    assert reached <= down_steps(policy, at_end) * (cooldown_ticks + 1)
    assert after[-1].decision.desired == policy.min_replicas
    assert flaps(policy, ticks) == []


# Edge cases


def test_min_zero_with_no_demand_stays_at_zero() -> None:
    policy = pool(DEFAULT, 0, 10)
    decisions = run_ticks(policy, [seen(0)] * 200)
    assert {(d.desired, d.reason) for d in decisions} == {(0, "at_min")}


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
@pytest.mark.parametrize(
    "observation", [seen(0, refused=1), seen(0, busy=1), seen(0, refused=10_000)]
)
def test_min_zero_scales_from_zero_on_demand(policy: PoolPolicy, observation: Observation) -> None:
    policy = pool(policy, 0, 10)
    decision = decide(policy, PoolState(), observation, NOW)
    assert 1 <= decision.desired <= policy.max_step


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_refusals_at_zero_start_a_replica_inside_the_up_cooldown(policy: PoolPolicy) -> None:
    policy = pool(policy, 0, 10)
    decision = decide(policy, PoolState(last_up_at=NOW - 0.001), seen(0, refused=3), NOW)
    assert (decision.desired, decision.reason) == (1, "refused")


@pytest.mark.parametrize(
    "observation",
    [seen(0, ready=9), seen(0, ready=6, starting=3, refused=5), seen(10**6, ready=30)],
)
def test_more_than_max_comes_down_to_max(observation: Observation) -> None:
    policy = pool(DEFAULT, 1, 5)
    decision = decide(policy, PoolState(last_up_at=NOW), observation, NOW)
    assert (decision.desired, decision.reason) == (5, "above_max")


@pytest.mark.parametrize("observation", [seen(0), seen(0, ready=1), seen(10, starting=2)])
def test_fewer_than_min_comes_up_to_min(observation: Observation) -> None:
    policy = pool(DEFAULT, 3, 5)
    decision = decide(policy, PoolState(last_up_at=NOW), observation, NOW)
    assert (decision.desired, decision.reason) == (3, "below_min")


def test_below_min_with_demand_above_scale_up_at_adds_what_demand_needs() -> None:
    """A pool that lost replicas below its floor while full: going to ``min_replicas`` alone
    leaves it above ``scale_up_at``, and the up cooldown that ``below_min`` starts then holds
    it there. Desired should be the larger of the floor and what demand needs."""
    lo = next(m for m in range(2, 1000) if (m - 1) / m > DEFAULT.scale_up_at)
    policy = pool(DEFAULT, lo, 1000)
    full = seen((lo - 1) * policy.max_sessions, ready=lo - 1)  # every ready replica full
    first = decide(policy, PoolState(), full, NOW)
    needed = replicas_for(full.demand, policy.max_sessions, policy.scale_up_at)
    assert first.desired >= needed, f"{first.desired} ({first.reason}), demand needs {needed}"


def test_a_pool_stepped_down_to_zero_is_not_scaled_straight_back_up() -> None:
    """One session came and went on a pool at min 0: the step down to zero ignores the rising
    trend it was still projecting, and on zero replicas any projection is infinite utilisation,
    so the next tick scales up again, with no session anywhere (a flap)."""
    policy = pool(DEFAULT, 0, 10)
    cooldown_s = policy.scale_down_cooldown_s
    blip = ((NOW - 8.0, 0), (NOW - 6.0, 0), (NOW - 4.0, 0), (NOW - 2.0, 1))
    state = PoolState(below_since=NOW - cooldown_s, samples=blip)
    first = decide(policy, state, seen(0, ready=1), NOW)
    then = decide(policy, first.state, seen(0, ready=first.desired), NOW + TICK_S)
    changes = [(first.delta, first.reason), (then.delta, then.reason)]
    assert not (first.delta < 0 and then.delta > 0), f"down then up at zero demand: {changes}"


def test_one_session_per_replica() -> None:
    policy = pool(DEFAULT, 1, 100, max_sessions=1)
    full = decide(policy, PoolState(), seen(1, ready=1), NOW)
    assert full.desired == 2
    ready = 20
    hot = math.floor(policy.scale_up_at * ready) + 1
    decision = decide(policy, PoolState(), seen(hot, ready=ready), NOW)
    assert decision.delta > 0
    assert util(policy, hot, decision.desired) <= policy.scale_up_at


def test_only_ready_and_starting_replicas_count() -> None:
    policy = pool(DEFAULT, 0, 100)
    sessions = sessions_at(policy, 6, policy.scale_up_at) + 1
    by_split = {
        decide(policy, PoolState(), Observation(sessions, ready=r, starting=6 - r), NOW)
        for r in range(7)
    }
    assert len(by_split) == 1
    draining = Observation(sessions, ready=6, draining=5)
    assert decide(policy, PoolState(), draining, NOW) in by_split
    assert draining.counted == 6


@pytest.mark.parametrize(
    "fields",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": -1, "max_replicas": 2},
        {"scale_down_at": 0.5, "scale_up_at": 0.5},
        {"scale_down_at": 0.6, "scale_up_at": 0.5},
        {"scale_down_at": 0.0, "scale_up_at": 0.5},
        {"scale_down_at": -0.1, "scale_up_at": 0.5},
        {"scale_down_at": 0.3, "scale_up_at": 1.01},
        {"max_sessions": 0},
        {"max_step": 0},
        {"down_step": 0.0},
        {"down_step": 1.5},
    ],
)
def test_pool_policy_rejects_bad_parameters(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        PoolPolicy(**fields)  # type: ignore[arg-type]


def test_pool_policy_accepts_the_edges() -> None:
    PoolPolicy(min_replicas=0, max_replicas=0, scale_up_at=1.0, down_step=1.0, max_step=1)
