"""The spare-worker keeper decides: spares counted right, none requested twice, none piled up."""

from __future__ import annotations

import logging
import time

import pytest

from cluster.node.warm_workers import (
    START_WINDOW_S,
    WarmState,
    WarmWorkerKeeper,
    WorkerInfo,
    decide,
)

NIL_JOB = b"\xff" * 4
NIL_ACTOR = b"\xff" * 16
JOB = bytes.fromhex("01000000")
ACTOR = bytes.fromhex("3fc0ca08907889fa717f05ad01000000")


def spare(pid: int) -> WorkerInfo:
    return WorkerInfo(pid=pid, is_plain_worker=True, job_id=NIL_JOB, actor_id=NIL_ACTOR)


def test_only_never_assigned_plain_workers_are_spares() -> None:
    assert spare(1).is_spare
    # A worker that ran a task (it has a job) cannot become an actor; nor can an actor's.
    assert not WorkerInfo(2, True, JOB, NIL_ACTOR).is_spare
    assert not WorkerInfo(3, True, JOB, ACTOR).is_spare
    # Drivers and I/O workers are not plain workers.
    assert not WorkerInfo(4, False, NIL_JOB, NIL_ACTOR).is_spare


def test_a_missing_spare_is_requested_once_while_it_starts() -> None:
    busy = [WorkerInfo(10, True, JOB, ACTOR), WorkerInfo(11, False, JOB, NIL_ACTOR)]
    start, state = decide(1, busy, WarmState(), now=0.0)
    assert start == 1
    # Not registered yet: still coming, not requested again.
    start, state = decide(1, busy, state, now=2.0)
    assert start == 0
    # It registered: nothing to do, and it no longer counts as coming.
    start, state = decide(1, [*busy, spare(12)], state, now=4.0)
    assert (start, state.coming) == (0, 0)
    # A replica took it right away: the next round replaces it, no window to wait out.
    start, state = decide(1, busy, state, now=6.0)
    assert start == 1


def test_a_spare_taken_before_the_keeper_saw_it_is_replaced_at_once() -> None:
    start, state = decide(1, [], WarmState(), now=0.0)
    assert start == 1
    # Between two rounds the spare registered and a replica took it: a new pid, now an actor's.
    taken = WorkerInfo(21, True, JOB, ACTOR)
    start, state = decide(1, [taken], state, now=1.0)
    assert start == 1


def test_a_worker_that_never_came_is_requested_again_after_the_window() -> None:
    start, state = decide(2, [], WarmState(), now=0.0)
    assert start == 2
    start, state = decide(2, [spare(5)], state, now=1.0)
    assert (start, state.coming) == (0, 1)
    start, state = decide(2, [spare(5)], state, now=START_WINDOW_S + 0.5)
    assert start == 1


def test_spares_over_the_target_start_nothing() -> None:
    start, _ = decide(1, [spare(1), spare(2), spare(3)], WarmState(), now=0.0)
    assert start == 0
    start, _ = decide(0, [], WarmState(), now=0.0)
    assert start == 0


def test_an_entry_for_a_worker_whose_stats_failed_is_no_spare() -> None:
    assert not WorkerInfo(pid=0, is_plain_worker=True, job_id=b"", actor_id=b"").is_spare
    assert not WorkerInfo(pid=7, is_plain_worker=True, job_id=b"", actor_id=b"").is_spare


class FakeRaylet:
    """A raylet whose answers the test scripts: a list of worker lists, or exceptions."""

    def __init__(self, answers: list[list[WorkerInfo] | Exception]) -> None:
        self.answers = answers
        self.prestarted: list[int] = []
        self.closed = False

    def workers(self) -> list[WorkerInfo]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def prestart(self, count: int) -> None:
        self.prestarted.append(count)

    def close(self) -> None:
        self.closed = True


def test_the_keeper_survives_failures_logs_each_kind_once_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unreadable = PermissionError(13, "Permission denied")
    raylet = FakeRaylet([unreadable, unreadable, [], [spare(3)]])
    keeper = WarmWorkerKeeper(lambda: raylet, target=1)
    caplog.set_level(logging.INFO, logger="hyperfleet.node")
    assert keeper.round() is False
    assert keeper.round() is False
    assert [r.getMessage() for r in caplog.records].count(
        "spare workers: PermissionError: [Errno 13] Permission denied (the node runs on without"
        " them)"
    ) == 1
    # The token became readable: the keeper asks for the missing spare, then sees it.
    assert keeper.round() is True
    assert raylet.prestarted == [1]
    assert keeper.round() is True
    assert raylet.prestarted == [1]


def test_a_keeper_that_cannot_build_its_client_leaves_the_node_alone() -> None:
    def connect() -> FakeRaylet:
        raise ImportError("no module named ray.core.generated")

    keeper = WarmWorkerKeeper(connect, target=1)
    assert keeper.round() is False


def test_the_keeper_thread_closes_its_client_when_stopped() -> None:
    raylet = FakeRaylet([[spare(1)] for _ in range(100)])
    keeper = WarmWorkerKeeper(lambda: raylet, target=1)
    keeper.start()
    deadline = time.monotonic() + 10
    while len(raylet.answers) == 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    keeper.stop()
    assert raylet.closed and raylet.prestarted == []
