"""The pool policy in closed loops: seeded demand, a tiny fleet whose starting replicas become
ready after a few ticks, ``decide`` tick by tick; no flaps, bounded time to serve a step up and
to come back down (seeds are printed on failure)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from autoscaling.pool_policy import (
    Decision,
    Observation,
    PoolPolicy,
    PoolState,
    decide,
    replicas_for,
)

from .pool_policy_cases import (
    DEFAULT,
    POLICIES,
    TICK_S,
    TIGHT,
    pool,
    util,
)

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
