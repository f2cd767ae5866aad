"""The spare-worker keeper decides: spares counted right, none requested twice, none piled up."""

from __future__ import annotations

from cluster.warm_workers import START_WINDOW_S, WarmState, WorkerInfo, decide

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
