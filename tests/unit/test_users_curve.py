"""The users curve's arithmetic: the steady window cut from the samples, the marginal cost."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from benchmarks.local_stack import Sampler, Seen
from benchmarks.users_curve import Point, marginal_ms, steady

INGRESS, WORKER = (1, 0.0), (2, 0.0)


def _sampler(history: list[tuple[float, dict[tuple[int, float], float]]]) -> Sampler:
    sampler = Sampler(Path("/nonexistent"))
    sampler.history = history
    sampler.procs = {INGRESS: Seen("ingress", 0.0, 0.0), WORKER: Seen("agent actors", 0.0, 0.0)}
    return sampler


def test_the_window_is_cut_at_the_samples_around_it() -> None:
    sampler = _sampler(
        [(t, {INGRESS: t - 100.0, WORKER: 2 * (t - 100.0)}) for t in range(100, 111)]
    )
    cpu, span = sampler.cpu_between(102.5, 105.5)
    assert span == 4.0  # the samples at 102 and 106
    assert cpu == {"ingress": 4.0, "agent actors": 8.0}
    assert sampler.cpu_between(50.0, 500.0) == ({"ingress": 10.0, "agent actors": 20.0}, 10.0)


def test_a_process_that_changed_role_brings_only_what_it_spent_in_the_window() -> None:
    # An idle Ray worker (2 CPU s spent starting) becomes an agent replica inside the window.
    sampler = _sampler([(100.0, {INGRESS: 1.0, WORKER: 2.0}), (110.0, {INGRESS: 1.5, WORKER: 2.5})])
    assert sampler.cpu_between(100.0, 110.0) == ({"ingress": 0.5, "agent actors": 0.5}, 10.0)


def _timed(history: list[tuple[float, float]]) -> Sampler:
    return _sampler([(t, {INGRESS: cpu}) for t, cpu in history])


def test_a_points_steady_window_counts_its_turns_and_cpu_after_the_ramp() -> None:
    zero = 1_000.0
    sampler = _timed([(zero + t, 0.1 * t) for t in range(0, 31)])
    report = {
        "started_at": zero,
        "duration": 32.0,
        "timeline": [{"second": s, "completed": 3} for s in range(32)],
    }
    point = Point(users=10, exit_code=0, tester_cpu_s=3.2)
    steady(point, report, sampler, argparse.Namespace(duration=30.0, ramp_up=6.0, think_time=4.0))
    assert point.steady_turns == 60  # seconds 10 (a think time past the ramp-up) to 29
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


def test_a_point_cut_short_has_no_window_and_reads_over_its_run() -> None:
    report = {"started_at": 1_000.0, "duration": 5.0, "timeline": []}
    point = Point(users=10, exit_code=124, wall_s=10.0, cpu_s={"ingress": 4.0}, tester_cpu_s=1.0)
    steady(point, report, _timed([]), argparse.Namespace(duration=0, ramp_up=6.0, think_time=4.0))
    assert not point.steady
    assert point.machine_busy() == pytest.approx(5.0 / 10.0 / (os.cpu_count() or 1))
    assert marginal_ms([point, point], 1) is None
