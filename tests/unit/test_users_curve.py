"""The users curve's arithmetic: the steady window cut from the samples, the marginal cost."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.local_stack import Sampler
from benchmarks.users_curve import Point, marginal_ms, steady


def _sampler(history: list[tuple[float, dict[str, float]]]) -> Sampler:
    sampler = Sampler(Path("/nonexistent"))
    sampler.history = history
    return sampler


def test_the_window_is_cut_at_the_samples_around_it() -> None:
    sampler = _sampler(
        [(t, {"ingress": t - 100.0, "agents": 2 * (t - 100.0)}) for t in range(100, 111)]
    )
    cpu, span = sampler.cpu_between(102.5, 105.5)
    assert span == 4.0  # the samples at 102 and 106
    assert cpu == {"ingress": 4.0, "agents": 8.0}
    assert sampler.cpu_between(50.0, 500.0) == ({"ingress": 10.0, "agents": 20.0}, 10.0)


def test_a_points_steady_window_counts_its_turns_and_cpu_after_the_ramp() -> None:
    zero = 1_000.0
    sampler = _sampler([(zero + t, {"ingress": 0.1 * t}) for t in range(0, 31)])
    report = {
        "started_at": zero,
        "duration": 32.0,
        "timeline": [{"second": s, "completed": 3} for s in range(32)],
    }
    point = Point(users=10, exit_code=0, tester_cpu_s=3.2)
    steady(point, report, sampler, argparse.Namespace(duration=30.0, ramp_up=10.0))
    assert point.steady_turns == 60  # seconds 10 to 29
    assert point.steady_s == 20.0
    assert point.steady_cpu_s == {"ingress": pytest.approx(2.0)}
    assert point.steady_ms_per_turn()["ingress"] == pytest.approx(2000.0 / 60)
    assert point.steady_ms_per_turn()["load tester"] == pytest.approx(3200.0 * 20 / 32 / 60)


def test_the_marginal_cost_is_the_cpu_rates_growth_over_the_turn_rates() -> None:
    low = Point(users=8, exit_code=0, steady_s=100.0, steady_turns=100, steady_cpu_s={"a": 30.0})
    high = Point(users=80, exit_code=0, steady_s=100.0, steady_turns=1100, steady_cpu_s={"a": 80.0})
    assert marginal_ms([low, high], 0) is None
    # 0.5 CPU s a second more for 10 turns a second more: 50 ms a turn, not 80 / 11 = 73.
    assert marginal_ms([low, high], 1) == pytest.approx(50.0)
    assert marginal_ms([low, low], 1) is None  # no more turns: no slope
