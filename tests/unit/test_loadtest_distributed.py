"""``--workers N``'s plain parts: the plan's split over N generators, the outcomes' columns,
the merge of the generators' results into one report, and the fleet's progress line."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from array import array
from pathlib import Path
from typing import Any

import pytest

from cluster.cli.commands import build_parser, main
from cluster.cli.loadtest_command import _ray_address
from cluster.loadtest import LoadTestConfig, Thresholds
from cluster.loadtest.columns import OutcomeColumns
from cluster.loadtest.generator import Counters, GeneratorResult
from cluster.loadtest.progress import Progress
from cluster.loadtest.report import Outcome, build_report
from cluster.loadtest.run import run_config
from cluster.loadtest.shares import (
    MAX_WORKERS,
    merge,
    request_bound_s,
    run_bound_s,
    split,
    worker_seed,
)
from cluster.loadtest.users import Plan


def _message(start: float, end: float, **kwargs: object) -> Outcome:
    fields: dict[str, object] = {"ok": True, "status": 200, "output_tokens": 10}
    fields.update(kwargs)
    return Outcome("message", start, end, **fields)  # type: ignore[arg-type]


def _result(index: int, outcomes: list[Outcome], **kwargs: object) -> GeneratorResult:
    return GeneratorResult(index, OutcomeColumns.of(outcomes), **kwargs)  # type: ignore[arg-type]


def test_users_split_as_evenly_as_possible_with_distinct_seeds_and_run_ids() -> None:
    plan = Plan(users=10, requests=3, think_time_s=1.0, seed=7)
    shares = split(plan, 3, "run")
    assert [s.index for s in shares] == [0, 1, 2]
    assert [s.plan.users for s in shares] == [4, 3, 3]
    assert len({s.plan.seed for s in shares}) == 3 and plan.seed not in {
        s.plan.seed for s in shares
    }
    assert [s.plan.seed for s in shares] == [s.plan.seed for s in split(plan, 3, "other")]
    assert [s.plan.seed for s in split(Plan(users=10, requests=3, seed=8), 3, "run")] != [
        s.plan.seed for s in shares
    ]
    assert len({s.run_id for s in shares}) == 3
    # Everything else is the run's own.
    assert all(
        (s.plan.requests, s.plan.think_time_s, s.plan.rate) == (3, 1.0, None) for s in shares
    )
    assert worker_seed(7, 0) == shares[0].plan.seed


def test_one_worker_is_todays_single_process_unchanged() -> None:
    plan = Plan(users=5, requests=2, rate=3.0, seed=11)
    assert [(s.index, s.plan, s.run_id) for s in split(plan, 1, "run")] == [(0, plan, "run")]


def test_the_rate_follows_each_generators_users_and_sums_to_the_runs() -> None:
    shares = split(Plan(users=10, requests=1, rate=6.0), 3, "run")
    rates = [s.plan.rate for s in shares]
    assert rates == pytest.approx([2.4, 1.8, 1.8])
    assert sum(r for r in rates if r is not None) == pytest.approx(6.0)
    # With --duration arrivals stop at the deadline, not at --users: the rate splits evenly,
    # and more generators than --users is allowed.
    timed = split(Plan(users=2, requests=1, rate=6.0, duration_s=30.0), 4, "run")
    assert [s.plan.rate for s in timed] == pytest.approx([1.5] * 4)
    assert all(s.plan.users >= 1 for s in timed)


@pytest.mark.parametrize(("users", "workers"), [(3, 4), (10, 0), (10_000, MAX_WORKERS + 1)])
def test_a_split_out_of_range_names_the_flag(users: int, workers: int) -> None:
    plan = Plan(users=users, requests=1)
    with pytest.raises(ValueError, match="--workers"):
        split(plan, workers, "run")
    with pytest.raises(ValueError, match="--workers"):
        LoadTestConfig("http://127.0.0.1:1", "k", plan, Thresholds(), workers=workers)


def test_too_many_workers_is_a_message_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--api-url", "http://127.0.0.1:1", "--api-key", "k", "--quiet"]
    code = main(["loadtest", *flags, "--users", "2", "--workers", "3"])
    assert code == 2
    assert "--workers: at most --users (2)" in capsys.readouterr().err


def test_the_default_ray_cluster_is_the_head_up_recorded_with_its_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"ray_address": "127.0.0.1:6380"}))
    (tmp_path / "ray_auth_token").write_text("token")
    args = build_parser().parse_args(["loadtest", "--workers", "2"])
    env = {"HYPERFLEET_HOME": str(tmp_path)}
    monkeypatch.setattr(os, "environ", env)
    assert _ray_address(args) == "127.0.0.1:6380"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_auth_token")
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # a head on loopback alone
    # $RAY_ADDRESS, and a token of one's own, come first; --ray-address before both.
    own = {"HYPERFLEET_HOME": str(tmp_path), "RAY_ADDRESS": "10.0.0.5:6379"}
    own["RAY_AUTH_TOKEN_PATH"] = "/elsewhere/token"
    monkeypatch.setattr(os, "environ", own)
    assert _ray_address(args) == "10.0.0.5:6379"
    assert own["RAY_AUTH_TOKEN_PATH"] == "/elsewhere/token" and "RAY_AUTH_MODE" not in own
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in own
    flagged = build_parser().parse_args(["loadtest", "--workers", "2", "--ray-address", "h:1"])
    assert _ray_address(flagged) == "h:1"


def test_outcomes_survive_their_columns_and_move_onto_the_common_clock() -> None:
    outcomes = [
        Outcome("open_session", 0.0, 0.1, ok=True, status=201),
        _message(0.1, 0.5, ttft_s=0.05, input_tokens=100, cost_usd=0.25, tool_call=True),
        _message(0.5, 2.0, retries=((0.9, "429"), (1.4, "connection")), cache_read_input_tokens=3),
        _message(2.0, 2.1, ok=False, status=None, error_type="timeout", output_tokens=0),
        Outcome("open_session", 0.0, 0.5, ok=False, status=429, error_type="rate_limited"),
    ]
    columns = OutcomeColumns.of(outcomes)
    assert len(columns) == 5 and columns.decode() == outcomes
    moved = columns.decode(shift_s=1.5)
    assert [(o.start_s, o.end_s) for o in moved] == [
        (o.start_s + 1.5, o.end_s + 1.5) for o in outcomes
    ]
    assert moved[2].retries == ((2.4, "429"), (2.9, "connection"))
    assert moved[1].ttft_s == 0.05  # a duration: not moved
    assert OutcomeColumns.of(()).decode() == []


def test_the_merge_is_one_run_of_every_generators_outcomes_and_load() -> None:
    first = [Outcome("open_session", 0.0, 0.1, ok=True, status=201), _message(0.1, 1.0)]
    second = [Outcome("open_session", 0.0, 0.2, ok=True, status=201), _message(0.2, 0.8)]
    results = [
        _result(
            1,
            second,
            elapsed_s=0.8,
            late_s=0.25,
            cpu_s=2.0,
            cpu_percent=80.0,
            lags_ms=array("d", [100.0] * 10),
            dropped_arrivals=2,
            rate_limited=1,
            rate_limits_seen=frozenset({100}),
            warnings=("the tester used 80 % of a core",),
        ),
        _result(
            0,
            first,
            elapsed_s=1.0,
            cpu_s=1.0,
            cpu_percent=20.0,
            lags_ms=array("d", [1.0] * 990),
            rate_limited=2,
            rate_limits_seen=frozenset({60}),
        ),
    ]
    merged = merge(results)
    assert sorted((o.op, o.start_s, o.end_s) for o in merged.outcomes) == sorted(
        [(o.op, o.start_s, o.end_s) for o in first]
        + [(o.op, o.start_s + 0.25, o.end_s + 0.25) for o in second]
    )
    assert merged.elapsed_s == pytest.approx(1.05) and merged.failures == []
    client = merged.client
    assert (client.processes, client.cpu_s, client.cpu_percent) == (2, 3.0, 80.0)
    # 1 % of the samples lag 100 ms: the p99 over all lies between the generators' own.
    assert 1.0 < client.loop_lag_p99_ms < 100.0 and client.loop_lag_max_ms == 100.0
    assert client.dropped_arrivals == 2
    assert client.warnings == ["worker 1: the tester used 80 % of a core"]
    assert (merged.rate_limited, merged.rate_limits_seen) == (3, frozenset({60, 100}))
    report = build_report(
        merged.outcomes,
        config=run_config(Plan(users=2, requests=1)),
        api_url="http://127.0.0.1:8000",
        date="2025-01-01T00:00:00Z",
        duration_s=merged.elapsed_s,
        thresholds=Thresholds(),
        client=client,
        run_failures=merged.failures,
    )
    assert (report.completed, report.sessions_opened, report.client.processes) == (2, 2, 2)
    assert report.passed


def test_one_generator_merges_as_the_single_process_reported() -> None:
    merged = merge([_result(0, [_message(0.0, 1.0)], cpu_s=1.0, warnings=("lagged",))])
    assert merged.client.processes == 1 and merged.client.warnings == ["lagged"]
    assert merged.outcomes == [_message(0.0, 1.0)]


def test_a_generator_that_failed_fails_the_run_and_the_others_are_reported() -> None:
    died = GeneratorResult.failed(1, "The actor died unexpectedly (exit: SYSTEM_ERROR)", "ab12")
    merged = merge([_result(0, [_message(0.0, 1.0)], elapsed_s=1.0, cpu_s=1.0), died])
    assert len(merged.outcomes) == 1 and merged.client.processes == 2
    assert merged.failures == [
        "load generator 1 of 2 failed on node ab12: The actor died unexpectedly (exit: "
        "SYSTEM_ERROR) (its requests are missing from this report)"
    ]
    report = build_report(
        merged.outcomes,
        config=run_config(Plan(users=2, requests=1)),
        api_url="http://127.0.0.1:8000",
        date="2025-01-01T00:00:00Z",
        duration_s=1.0,
        thresholds=Thresholds(),
        client=merged.client,
        run_failures=merged.failures,
    )
    assert report.completed == 1 and not report.passed
    assert report.failed_criteria[0].startswith("load generator 1 of 2 failed")


def test_a_generator_that_started_late_is_named() -> None:
    merged = merge([_result(0, [], late_s=0.0), _result(1, [], late_s=1.7)])
    assert merged.client.warnings == [
        "worker 1: started 1.7 s after the common start (its times are moved onto it; its "
        "first seconds overlap the others' less)"
    ]


def test_the_runs_start_is_the_common_one_whichever_generator_began_late() -> None:
    on_time = _result(0, [_message(0.0, 1.0)], started_at=1_000.0)
    late = _result(1, [_message(0.0, 1.0)], started_at=1_000.5, late_s=0.5)
    failed = GeneratorResult.failed(2, "gone")
    assert merge([late, failed, on_time]).started_at == pytest.approx(1_000.0)
    assert merge([failed]).started_at == 0.0


def test_the_runs_bound_covers_the_plans_worst_case() -> None:
    closed = Plan(users=5, requests=4, timeout_s=10.0, max_retries=2)
    assert request_bound_s(closed) == 3 * 10.0 + 2 * 30.0
    assert run_bound_s(closed) > 5 * request_bound_s(closed)
    timed = Plan(users=5, requests=4, duration_s=600.0, timeout_s=10.0)
    assert run_bound_s(timed) > 600.0 + request_bound_s(timed)
    arrivals = Plan(users=100, requests=1, rate=1.0, timeout_s=10.0)
    assert run_bound_s(arrivals) > 100.0 + request_bound_s(arrivals)


def _counters(completed: int, latencies: list[float], **kwargs: object) -> Counters:
    fields: dict[str, object] = {
        "started": True,
        "elapsed_s": 5.0,
        "sessions_open": 3,
        "in_flight": 2,
        "completed": completed,
        "failed": 1,
        "retries": 0,
        "cpu_percent": 10.0,
        "lag_p99_ms": 1.0,
        "latencies_s": array("d", latencies),
        "warnings": (),
    }
    fields.update(kwargs)
    return Counters(**fields)  # type: ignore[arg-type]


def test_the_progress_line_adds_the_generators_and_warns_once_each() -> None:
    now = [100.0]
    progress = Progress(2, clock=lambda: now[0])
    lagging = ("the tester's event loop lagged 80 ms",)
    found = progress.update([_counters(4, [0.1, 0.2]), _counters(6, [0.3], warnings=lagging)])
    assert found == ["worker 1: the tester's event loop lagged 80 ms"]
    line = progress.line()
    assert "workers 2/2" in line and "sessions 6, in flight 4" in line
    assert "ok 10, failed 2" in line and "0.6 req/s" in line  # 3 latencies over 5 s
    now[0] += 1.0
    # A generator that did not answer keeps its last counts; a warning is not repeated.
    assert progress.update([None, _counters(7, [], warnings=lagging, cpu_percent=90.0)]) == []
    assert "ok 11" in progress.line() and "tester cpu max 90 %" in progress.line()
    now[0] += 20.0
    progress.update([None, None])
    assert "p95 -" in progress.line()  # the window has moved past every latency


def test_one_generators_progress_line_reads_as_before() -> None:
    progress = Progress(1)
    progress.update([_counters(4, [0.5], warnings=("lagged",))])
    line = progress.line()
    assert line.startswith("[   5.0 s] sessions 3, in flight 2 | ok 4, failed 1, retries 0 |")
    assert "workers" not in line and "max" not in line


def test_a_think_time_ends_at_the_runs_deadline() -> None:
    from cluster.loadtest.users import Live, Load, Target

    plan = Plan(users=1, requests=3, think_time_s=1_000.0, duration_s=0.05)
    load = Load(None, Target("http://127.0.0.1:9", "k", "a"), plan, "run", Live())  # type: ignore[arg-type]
    load.deadline = load.clock() + 0.05

    async def think() -> float:
        began = load.clock()
        await asyncio.wait_for(load._think(random.Random(1)), 5.0)
        return load.clock() - began

    assert asyncio.run(think()) < 1.0  # not the ~1,000 s mean


def test_a_generator_whose_counters_stop_answering_is_stopped_as_hung(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import concurrent.futures

    from cluster.loadtest import distributed

    monkeypatch.setattr(distributed, "UNRESPONSIVE_S", 0.3)
    monkeypatch.setattr(distributed, "LIVENESS_POLL_S", 0.05)

    class Ref:
        def __init__(self, value: object = None, forever: bool = False) -> None:
            self._future: concurrent.futures.Future[object] = concurrent.futures.Future()
            if not forever:
                self._future.set_result(value)

        def future(self) -> concurrent.futures.Future[object]:
            return self._future

    class Method:
        def __init__(self, make: Any) -> None:
            self.remote = make

    class Handle:
        """A generator's actor as the driver sees it: ``run`` never ends; ``counters``
        answers, or (hung) never does."""

        def __init__(self, hung: bool) -> None:
            self.run = Method(lambda *_: Ref(forever=True))
            self.counters = Method(lambda: Ref(forever=True) if hung else Ref(None))

    killed: list[int] = []

    class Fleet(distributed.Fleet):
        def _kill(self, index: int) -> None:
            killed.append(index)

    fleet = Fleet([Handle(hung=False), Handle(hung=True)], joined=False)

    async def wait() -> set[int]:
        runs = [asyncio.get_running_loop().create_future() for _ in range(2)]
        return await fleet._wait(runs, bound_s=2.0)

    async def run() -> tuple[set[int], float]:
        began = time.monotonic()
        hung = await asyncio.wait_for(wait(), 10.0)
        return hung, time.monotonic() - began

    hung, took_s = asyncio.run(run())
    assert hung == {1} and killed == [1]
    assert took_s >= 1.9  # the answering one was waited for to the bound, not stopped
