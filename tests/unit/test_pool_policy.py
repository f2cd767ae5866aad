"""The agent pool's scaling decision (``autoscaling/pool_policy.decide``), swept as a unit.

Written in the manner of Ray Serve's ``tests/unit/test_autoscaling_policy.py``: the policy is a
pure function, so the tests feed it observations on a fake clock and read the decision back. Every
expected number is derived from the policy's own fields (thresholds, cooldowns, steps), never
copied from today's defaults, so retuning the defaults keeps these tests meaningful.

Here: cooldowns; aggressive steps; the trend; purity and the state's JSON round trip; edge cases.
The exhaustive grid is ``test_pool_policy_grid.py``, the closed loops ``test_pool_policy_loops.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace

import pytest

from autoscaling.pool_policy import (
    TREND_SAMPLES_MAX,
    Decision,
    Observation,
    PoolPolicy,
    PoolState,
    decide,
    replicas_for,
    trend_per_s,
)

from .pool_policy_cases import (
    DEFAULT,
    NOW,
    POLICIES,
    TICK_S,
    TIGHT,
    exact_capacity,
    pool,
    run_ticks,
    seen,
    sessions_at,
    util,
)

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


@pytest.mark.parametrize(
    "value", [PoolPolicy(), PoolState(), seen(1), Decision(1, "steady", PoolState(), 1)]
)
def test_inputs_and_decisions_are_frozen(value: object) -> None:
    name = dataclasses.fields(value)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, name, None)


def round_trip(state: PoolState) -> PoolState:
    return PoolState.from_json(json.loads(json.dumps(state.to_json())))


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
