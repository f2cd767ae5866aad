"""The autoscaling simulation (``benchmarks/autoscale_sim.py``) and its traces: the accounting
on hand-computed cases, determinism, and the shipped traces against their generator."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from autoscaling import Observation
from benchmarks import autoscale_sim as sim
from benchmarks import autoscale_traces as traces
from benchmarks.autoscale_traces import Trace


def trace(sessions: Sequence[tuple[float, float]], end_s: float, start_s: float = 0.0) -> Trace:
    ordered = sorted(sessions)
    return Trace(
        name="hand",
        arrivals_s=tuple(a for a, _ in ordered),
        lengths_s=tuple(n for _, n in ordered),
        start_s=start_s,
        end_s=end_s,
    )


class Scripted:
    """A controller that holds ``replicas`` except at the given times."""

    name = "scripted"
    steps_on_refusal = False

    def __init__(self, replicas: int, changes: dict[float, int] | None = None) -> None:
        self.replicas = replicas
        self.changes = changes or {}

    def step(self, seen: Observation, now: float, samples: Sequence[int]) -> int:
        self.replicas = self.changes.get(now, self.replicas)
        return self.replicas


def tiny(seed: int = 7) -> Trace:
    """Ten minutes of sessions: a steady rate, then a burst at 300 s."""
    rng = random.Random(seed)
    sessions = [(rng.uniform(-120, 600), rng.uniform(20, 200)) for _ in range(1500)]
    sessions += [(300 + rng.random() * 10, rng.uniform(60, 120)) for _ in range(400)]
    return trace(sessions, end_s=600, start_s=-120)


# The oracle


def test_the_oracle_integrates_ceil_of_demand_over_the_window() -> None:
    # Demand 1 on [0,5), 2 on [5,6), 3 on [6,7), 2 on [7,10), 1 on [10,15), 0 on [15,20).
    hand = trace([(0, 10), (5, 10), (6, 1)], end_s=20)
    assert traces.demand_replica_s(hand, max_sessions=2, utilisation=1.0) == 5 + 1 + 2 + 3 + 5
    assert traces.demand_replica_s(hand, max_sessions=2, utilisation=0.5) == 5 + 2 + 3 + 6 + 5
    with_floor = traces.demand_replica_s(hand, max_sessions=2, utilisation=1.0, min_replicas=1)
    assert with_floor == 16 + 5


def test_the_oracle_counts_warm_up_sessions_and_stops_at_the_end() -> None:
    # From before the window, still running at 0; and one that outlives it.
    hand = trace([(-5, 10), (8, 100)], end_s=10)
    assert traces.demand_replica_s(hand, max_sessions=1, utilisation=1.0) == 5 + 2


def test_an_exact_multiple_of_the_threshold_needs_no_extra_replica() -> None:
    hand = trace([(0, 10)] * 8, end_s=10)
    assert traces.demand_replica_s(hand, max_sessions=10, utilisation=0.8) == 10


# Refusals, bursts and flaps


def test_refused_time_and_the_worst_burst_on_a_hand_computed_case() -> None:
    # One replica (100 sessions): 150 arrive in second 10 (50 refused), then 120 in second 20
    # and 5 in second 21, all refused while the first 100 still run.
    sessions = [(10 + i / 200, 100.0) for i in range(150)]
    sessions += [(20 + i / 200, 5.0) for i in range(120)] + [(21.5 + i / 10, 5.0) for i in range(5)]
    run = sim.simulate(trace(sessions, end_s=100), Scripted(1), seed=1)
    assert (run.refused_sessions, run.refused_seconds) == (50 + 120 + 5, 3)
    assert run.refused_share == pytest.approx(3 / 100)
    assert (run.worst_burst_s, run.worst_burst_refused) == (2, 125)
    assert run.arrivals == 275
    assert run.replica_hours == pytest.approx(100 / 3600)
    assert run.actions == [] and run.flaps == 0


def test_refusals_in_the_warm_up_are_not_counted() -> None:
    sessions = [(-10 + i / 200, 50.0) for i in range(150)]
    run = sim.simulate(trace(sessions, end_s=20, start_s=-20), Scripted(1), seed=1)
    assert run.refused_sessions == 0 and run.arrivals == 0


def test_worst_burst_is_the_longest_run_then_the_most_refused() -> None:
    assert sim.worst_burst([0, 1, 2, 0, 3, 3, 3, 0, 5]) == (3, 9)
    assert sim.worst_burst([1, 1, 0, 5, 5]) == (2, 10)
    assert sim.worst_burst([0, 0]) == (0, 0)


@pytest.mark.parametrize(
    ("actions", "flaps"),
    [
        ([(0, 1), (100, -1)], 1),  # up, then down within the window
        ([(0, 1), (300, -1)], 0),  # exactly a window apart: not a flap
        ([(0, -1), (10, -1), (200, 1)], 1),  # down, down, up
        ([(0, 1), (10, 1), (20, 1)], 0),
        ([(0, 1), (100, -1), (150, 1)], 2),
        ([], 0),
    ],
)
def test_a_flap_is_an_opposite_action_within_the_window(
    actions: list[tuple[float, int]], flaps: int
) -> None:
    assert sim.count_flaps(actions, window_s=300) == flaps


def test_the_simulation_counts_actions_and_flaps() -> None:
    hand = trace([(1, 1000)], end_s=1000)
    run = sim.simulate(hand, Scripted(1, {100.0: 3, 200.0: 2, 700.0: 4}), seed=1)
    assert run.actions == [(100.0, 1), (200.0, -1), (700.0, 1)]
    assert (run.actions_up, run.actions_down, run.flaps) == (2, 1, 1)


# The fleet


def test_a_free_vm_slot_starts_warm_and_a_full_fleet_adds_a_vm() -> None:
    fleet = sim.Fleet(random.Random(1), now=0.0, replicas=1)
    assert (fleet.ready, len(fleet.vms)) == (1, 1)
    fleet.start(10.0, sim.SLOTS_PER_VM - 1)  # the first VM's free slots
    assert len(fleet.vms) == 1 and 10 < fleet.next_ready_at() < 11
    fleet.promote(11.0)
    assert fleet.ready == sim.SLOTS_PER_VM
    fleet.start(20.0, 1)
    assert len(fleet.vms) == 2 and 25 < fleet.next_ready_at() < 11 + 20
    fleet.promote(19.9)
    assert fleet.starting == 1


def test_removing_cancels_starts_first_and_idle_vms_go_after_the_timeout() -> None:
    fleet = sim.Fleet(random.Random(1), now=0.0, replicas=1)
    fleet.start(0.0, 1)  # warm, on the first VM
    fleet.start(0.0, sim.SLOTS_PER_VM)  # fills it, then a new VM
    fleet.remove(1.0, 1, hosted=0)
    assert (fleet.starting, fleet.ready) == (sim.SLOTS_PER_VM, 1)
    fleet.remove(1.0, sim.SLOTS_PER_VM, hosted=0)
    assert (fleet.starting, fleet.ready) == (0, 1)
    fleet.reap(1.0 + sim.VM_IDLE_TIMEOUT_S - 1)
    assert len(fleet.vms) == 2
    fleet.reap(1.0 + sim.VM_IDLE_TIMEOUT_S)
    assert len(fleet.vms) == 1


def test_a_removed_replica_drains_while_its_sessions_do_not_fit() -> None:
    fleet = sim.Fleet(random.Random(1), now=0.0, replicas=2)
    fleet.promote(10.0)
    fleet.remove(10.0, 1, hosted=150)
    assert (fleet.ready, fleet.draining) == (1, 1)
    fleet.settle(20.0, hosted=100)
    assert (fleet.ready, fleet.draining) == (1, 0)


# The policies on a tiny trace


@pytest.mark.parametrize("policy", list(sim.POLICIES))
def test_a_tiny_trace_runs_deterministically(policy: str) -> None:
    first = sim.simulate(tiny(), sim.POLICIES[policy](), seed=3)
    again = sim.simulate(tiny(), sim.POLICIES[policy](), seed=3)
    assert dataclasses.asdict(first) == dataclasses.asdict(again)
    assert first.arrivals > 0 and first.replica_hours > 0
    assert first.oracle_b_hours >= first.oracle_a_hours > 0
    json.dumps(dataclasses.asdict(first))


def test_the_pool_policy_does_not_compound_its_doubling_while_replicas_start() -> None:
    # 1,000 sessions at once onto 2 replicas: refusals go on until the new VMs are up (~8 s),
    # and the pool controller reports only the first of them, so one doubling, then sizing.
    hand = trace([(i / 1000, 600.0) for i in range(150)] + [(60 + i / 100, 600.0) for i in
                  range(1000)], end_s=300)  # fmt: skip
    run = sim.simulate(hand, sim.PoolPolicyController(), seed=1)
    assert run.refused_sessions > 0
    assert run.peak_replicas <= 2 * 15  # what 1,150 sessions need at 80 %, doubled at most


def test_a_variant_changes_the_named_fields() -> None:
    controller = sim.variant("scale_down_at=0.5,max_step=10")()
    assert controller.name == "80/50 max_step=10"
    assert isinstance(controller, sim.PoolPolicyController)
    assert (controller.policy.scale_down_at, controller.policy.max_step) == (0.5, 10)
    with pytest.raises(ValueError, match="not a PoolPolicy field"):
        sim.variant("nonsense=1")


# The traces


@pytest.mark.parametrize("name", list(traces.GENERATORS))
def test_the_shipped_traces_are_what_the_generator_writes(name: str) -> None:
    filename, generate = traces.GENERATORS[name]
    shipped = gzip.decompress((traces.TRACES_DIR / filename).read_bytes()).decode()
    assert shipped == generate(traces.SEED), "regenerate: python -m benchmarks.autoscale_traces"
    assert (traces.TRACES_DIR / filename).stat().st_size < 2_000_000


def test_an_azure_row_is_a_session_from_its_timestamp_lasting_by_its_tokens() -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,1000,100\n"
        "2023-11-16 18:15:48.1805900,10,0\n"
    )
    parsed = traces.parse("azure", text)
    assert parsed.arrivals_s == (0.0, 1.5)
    assert parsed.lengths_s == (1000 / 12.5 + 100 / 50, 1.0)
    assert (parsed.start_s, parsed.end_s) == (-traces.WARMUP_S, 3600.0)


def test_write_results_appends_under_today_and_replaces_its_own(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    others = "# Results\n\nIntro.\n\n## 2026-12-02\n\n### Other\n\nkept\n\n## 2026-12-01\n\nold\n"
    path.write_text(others)
    sim.write_results(f"{sim.SECTION}\n\nfirst\n", path, today="2026-12-02")
    sim.write_results(f"{sim.SECTION}\n\nsecond\n", path, today="2026-12-02")
    assert path.read_text() == others.replace("kept\n\n", f"kept\n\n{sim.SECTION}\n\nsecond\n\n")


def test_write_results_opens_today_above_the_newest_date(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nIntro.\n\n## 2026-12-01\n\nold\n")
    sim.write_results(f"{sim.SECTION}\n\nnew\n", path, today="2026-12-02")
    assert path.read_text() == (
        f"# Results\n\nIntro.\n\n## 2026-12-02\n\n{sim.SECTION}\n\nnew\n\n## 2026-12-01\n\nold\n"
    )
