"""The chaos checker against small hand-made histories: each detection on a history that has the
fault it looks for, and silent on the same history without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.chaos.checker import (
    BudgetState,
    BudgetSummary,
    FinalState,
    MeterState,
    SessionState,
    TurnSeen,
    check,
    fault_kind_at,
)
from benchmarks.chaos.faults import StackDaemons, without_faults
from benchmarks.chaos.history import Fault, History, Request, read, request_of
from benchmarks.chaos.schedule import schedule
from benchmarks.chaos.table import render, rows
from cluster.loadtest.users import Attempt, Sent

S = "ses_a"


def msg(
    key: str,
    at: float,
    turn_id: str | None = None,
    index: int | None = None,
    session: str = S,
    took: float = 0.1,
    events: list[tuple[str, int | None]] | None = None,
    error: str | None = None,
    attempt: int = 0,
) -> Request:
    """A message attempt sent at ``at``: acknowledged as ``turn_id`` at ``index`` if given."""
    acked = turn_id is not None
    return Request(
        op="message",
        session_id=session,
        key=key,
        attempt=attempt,
        sent_at=at,
        answered_at=at + took,
        status=200 if acked else (503 if error is None else None),
        error=None if acked else (error or "unavailable"),
        content=f"message {key}",
        stream=events is not None,
        acked=acked,
        turn_id=turn_id,
        index=index,
        events=events or [],
    )


def turn(index: int, turn_id: str, key: str, tokens: int = 10) -> TurnSeen:
    return TurnSeen(index, turn_id, f"message {key}", tokens)


def state(*turns: TurnSeen, session: str = S, **kw: Any) -> SessionState:
    return SessionState(session, tuple(turns), kw.pop("version", len(turns)), **kw)


def final(*sessions: SessionState, meter: MeterState | None = None) -> FinalState:
    return FinalState({s.session_id: s for s in sessions}, meter)


def meter(turn_ids: list[str], turns: int | None = None, tokens: int = 1_000) -> MeterState:
    ids = frozenset(f"{t}:end" for t in turn_ids)
    return MeterState(ids, len(ids), len(ids) if turns is None else turns, tokens)


CLEAN = [msg("k1", 0.0, "t1", 1), msg("k2", 1.0, "t2", 2)]
CLEAN_STATE = state(turn(1, "t1", "k1"), turn(2, "t2", "k2"))


def test_a_clean_run_has_no_findings() -> None:
    report = check(CLEAN, [], final(CLEAN_STATE, meter=meter(["t1", "t2"])))
    assert report.ok(), report.findings
    assert (report.messages, report.acked, report.failed) == (2, 2, 0)


def test_an_acknowledged_turn_missing_from_the_transcript_is_lost() -> None:
    report = check(CLEAN, [], final(state(turn(1, "t1", "k1"))))
    assert [(f.check, f.session_id) for f in report.findings] == [("lost", S)]
    assert "t2" in report.findings[0].detail


def test_a_failed_turn_missing_from_the_transcript_is_not_lost() -> None:
    history = [*CLEAN, msg("k3", 2.0)]  # never acknowledged
    report = check(history, [], final(CLEAN_STATE))
    assert report.ok() and report.failed == 1


def test_two_turns_acknowledged_for_one_key_are_duplicated() -> None:
    history = [*CLEAN, msg("k2", 2.0, "t3", 3, attempt=1)]
    transcript = state(turn(1, "t1", "k1"), turn(2, "t2", "k2"), turn(3, "t3", "k2"))
    report = check(history, [], final(transcript))
    assert [f.check for f in report.findings] == ["duplicated"]
    assert "k2" in report.findings[0].detail


def test_a_replay_of_the_same_turn_is_not_a_duplicate() -> None:
    history = [*CLEAN, msg("k2", 2.0, "t2", 2, attempt=1)]
    assert check(history, [], final(CLEAN_STATE)).ok()


def test_one_message_committed_twice_unseen_by_the_client_is_duplicated() -> None:
    transcript = state(turn(1, "t1", "k1"), turn(2, "t2", "k2"), turn(3, "tx", "k2"))
    report = check(CLEAN, [], final(transcript))
    assert [f.check for f in report.findings] == ["duplicated"]
    assert "[2, 3]" in report.findings[0].detail


def test_transcript_indices_with_a_gap_are_out_of_order() -> None:
    transcript = state(turn(1, "t1", "k1"), turn(3, "t2", "k2"), version=3)
    report = check([*CLEAN[:1], msg("k2", 1.0, "t2", 3)], [], final(transcript))
    assert [f.check for f in report.findings] == ["order"]


def test_an_acknowledged_index_that_differs_from_the_transcript_is_out_of_order() -> None:
    history = [msg("k1", 0.0, "t1", 1), msg("k2", 1.0, "t2", 1)]  # both acked as index 1
    report = check(history, [], final(CLEAN_STATE))
    assert [f.check for f in report.findings] == ["order"]
    assert "index 1, kept as 2" in report.findings[0].detail


def test_turns_kept_in_the_opposite_order_they_were_acknowledged_are_out_of_order() -> None:
    history = [msg("k1", 0.0, "t1"), msg("k2", 1.0, "t2")]  # acked with no index
    transcript = state(turn(1, "t2", "k2"), turn(2, "t1", "k1"))
    report = check(history, [], final(transcript))
    assert [f.check for f in report.findings] == ["order"]
    assert "kept before" in report.findings[0].detail


def stream(first: int, n: int) -> list[tuple[str, int | None]]:
    kinds = ["turn_start"] + ["text_delta"] * (n - 2) + ["turn_end"]
    return [(k, first + i) for i, k in enumerate(kinds)]


def test_stream_ids_going_up_by_one_pass() -> None:
    history = [
        msg("k1", 0.0, "t1", 1, events=stream(1, 4)),
        msg("k2", 1.0, "t2", 2, events=stream(5, 3)),
    ]
    assert check(history, [], final(CLEAN_STATE)).ok()


def test_a_stream_skipping_an_id_is_a_seq_finding() -> None:
    events = [("turn_start", 1), ("text_delta", 2), ("text_delta", 4), ("turn_end", 5)]
    report = check([msg("k1", 0.0, "t1", 1, events=events)], [], final(state(turn(1, "t1", "k1"))))
    assert [f.detail for f in report.findings] == ["skipped: 2 then 4"]


def test_a_stream_going_backwards_is_a_seq_finding() -> None:
    events = [("turn_start", 1), ("text_delta", 2), ("text_delta", 2), ("turn_end", 3)]
    report = check([msg("k1", 0.0, "t1", 1, events=events)], [], final(state(turn(1, "t1", "k1"))))
    assert [f.detail for f in report.findings] == ["backwards: 2 then 2"]


def test_an_error_event_numbered_zero_is_not_a_seq_finding() -> None:
    events = [("turn_start", 1), ("text_delta", 2), ("error", 0)]
    history = [msg("k1", 0.0, events=events), msg("k1", 1.0, "t1", 1, events=stream(1, 3))]
    assert check(history, [], final(state(turn(1, "t1", "k1")))).ok()


def test_an_acked_stream_starting_below_the_previous_one_is_a_seq_finding() -> None:
    history = [
        msg("k1", 0.0, "t1", 1, events=stream(1, 4)),
        msg("k2", 1.0, "t2", 2, events=stream(3, 3)),
    ]
    report = check(history, [], final(CLEAN_STATE))
    assert [f.check for f in report.findings] == ["seq"]
    assert "starts at 3" in report.findings[0].detail


def test_a_committed_turn_with_no_final_record_is_unmetered() -> None:
    report = check(CLEAN, [], final(CLEAN_STATE, meter=meter(["t1"])))
    assert [(f.check, f.detail) for f in report.findings] == [("unmetered", "turn t2")]


def test_more_turns_counted_than_final_records_is_metered_twice() -> None:
    report = check(CLEAN, [], final(CLEAN_STATE, meter=meter(["t1", "t2"], turns=3)))
    assert [f.check for f in report.findings] == ["metered_twice"]


def test_fewer_tokens_metered_than_committed_turns_used_is_usage_short() -> None:
    report = check(CLEAN, [], final(CLEAN_STATE, meter=meter(["t1", "t2"], tokens=19)))
    assert [f.check for f in report.findings] == ["usage_short"]
    assert check(CLEAN, [], final(CLEAN_STATE, meter=meter(["t1", "t2"], tokens=20))).ok()


def test_a_session_that_cannot_be_read_or_take_a_message_is_unresumable() -> None:
    unreadable = SessionState(S, None, read_error="503 unavailable")
    report = check(CLEAN, [], final(unreadable))
    assert [f.check for f in report.findings] == ["unresumable"]
    stuck = state(turn(1, "t1", "k1"), turn(2, "t2", "k2"), resume_error="timeout")
    report = check(CLEAN, [], final(stuck))
    assert [(f.check, f.detail) for f in report.findings] == [
        ("unresumable", "new message: timeout")
    ]


def test_recovery_is_the_slowest_disturbed_sessions_first_ack_after_the_fault() -> None:
    kill = Fault("replica-kill", "pid 1", 10.0, 10.0)
    history = [
        msg("k1", 9.0, "t1", 1),
        msg("k2", 10.0, took=0.5),  # failed at 10.5
        msg("k2", 11.0, "t2", 2, took=1.0, attempt=1),  # back at 12.0
        msg("j1", 10.2, "u1", 1, session="ses_b"),  # undisturbed
        msg("m1", 10.0, took=0.2, session="ses_c"),  # failed, never back
    ]
    report = check(history, [kill], final(CLEAN_STATE))
    (recovery,) = report.recoveries
    assert (recovery.disturbed, recovery.unrecovered) == (2, 1)
    assert recovery.recovery_s == recovery.after_end_s == 2.0


def test_a_request_stalled_over_a_pause_disturbs_its_session() -> None:
    pause = Fault("replica-pause", "pid 1", 10.0, 20.0)
    history = [msg("k1", 9.0, "t1", 1, took=12.0)]  # answered at 21 once resumed
    (recovery,) = check(history, [pause], final(state(turn(1, "t1", "k1")))).recoveries
    assert (recovery.disturbed, recovery.recovery_s, recovery.after_end_s) == (1, 11.0, 1.0)


def test_findings_are_placed_in_the_window_of_the_last_fault_before_them() -> None:
    faults = [Fault("a", "", 10.0, 10.0), Fault("b", "", 20.0, 25.0)]
    assert fault_kind_at(faults, 5.0) == "no fault"
    assert fault_kind_at(faults, 15.0) == "a"
    assert fault_kind_at(faults, 30.0) == "b"
    assert fault_kind_at(faults, None) == "after the run"


def test_the_history_file_reads_back_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history = History(path)
    events: list[tuple[str, int | None]] = [("turn_start", 1), ("turn_end", 2)]
    body = {"turn_id": "t1", "index": 1, "replayed": False}
    attempt = Attempt(200, None, None, body, events=tuple(events), started_turn_id="t1")
    sent = Sent("message", S, "k1", 0, 5.0, 6.0, {"content": "hi"}, True, attempt)
    history.add(request_of(sent, lambda t: 1000.0 + t))
    history.add(Fault("replica-kill", "pid 7", 1.0, 1.0))
    history.close()
    back = list(read(path))
    assert back == history.records
    request = back[0]
    assert isinstance(request, Request)
    assert (request.acked, request.turn_id, request.index, request.turn_end) == (
        True,
        "t1",
        1,
        True,
    )
    assert (request.sent_at, request.content) == (1005.0, "hi")
    assert json.loads(path.read_text().splitlines()[1])["record"] == "fault"


def test_an_open_records_the_session_it_made() -> None:
    attempt = Attempt(201, None, None, {"id": "ses_new"})
    sent = Sent("open_session", None, None, 0, 0.0, 1.0, None, False, attempt)
    request = request_of(sent, lambda t: t)
    assert (request.op, request.session_id, request.acked) == ("open", "ses_new", False)


def test_the_schedule_is_seeded_one_kind_at_a_time_then_mixed() -> None:
    kinds = ("replica-kill", "control-kill", "redis-restart")
    plan = schedule(7, kinds, duration_s=300.0, gap_s=20.0)
    assert plan == schedule(7, kinds, duration_s=300.0, gap_s=20.0)
    assert plan != schedule(8, kinds, duration_s=300.0, gap_s=20.0)
    assert [p.kind for p in plan[:3]] == list(kinds)
    assert len(plan) > 3 and {p.kind for p in plan[3:]} <= set(kinds)
    starts = [p.at_s for p in plan]
    assert starts == sorted(starts) and starts[-1] < 300.0


def test_the_table_places_findings_under_the_fault_before_them() -> None:
    kill = Fault("replica-kill", "pid 1", 0.5, 0.5)
    history = [*CLEAN, msg("k3", 1.5, took=0.2)]
    report = check(history, [kill], final(state(turn(1, "t1", "k1"))))
    (row,) = rows(report, [kill])
    assert (row.kind, row.count, row.lost, row.disturbed) == ("replica-kill", 1, 1, 1)
    text = render(report, [kill])
    assert "| replica-kill | 1 | 1 | 1 | 0 |" in text
    assert "- lost: 1, e.g. in ses_a: turn t2 (key k2) acked" in text


def test_the_emulator_is_restarted_without_the_fault_flags_it_was_given() -> None:
    argv = ["python", "-m", "cluster.cli", "emulator", "--port", "8390", "--fault-429", "0.02"]
    assert without_faults(argv) == argv[:6]


def test_the_stacks_daemons_are_restarted_as_up_recorded_them(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    argv = ["python", "-m", "cluster.cli", "emulator", "--port", "8390", "--ttft-ms=200"]
    (tmp_path / "run" / "emulator.json").write_text(json.dumps({"pid": 1, "argv": argv}))
    daemons = StackDaemons(tmp_path)
    assert (daemons.argv("emulator"), daemons.port("emulator")) == (argv, 8390)


def test_faults_that_overlapped_get_rows_of_their_own() -> None:
    pause = Fault("replica-pause", "pid 1", 10.0, 25.0)
    outage = Fault("emulator-outage", "emulator", 14.0, 30.0)
    alone = Fault("replica-pause", "pid 2", 0.0, 5.0)
    report = check(CLEAN, [alone, pause, outage], final(CLEAN_STATE))
    names = [row.kind for row in rows(report, [alone, pause, outage])]
    assert names == ["replica-pause", "replica-pause (mixed)", "emulator-outage (mixed)"]


def test_an_upstream_fault_window_reports_success_after_resends_and_amplification() -> None:
    """Four messages first sent in the window: three acknowledged (one after a resend), one
    never; the model API took 5 calls and struck 1 fault for the 3 turns acked in the window:
    5 / (3 + 1) = 1.25, a call spent on nothing. A message sent before the window is not
    counted, and a window without the API's counts has no line."""
    window = Fault("upstream-faults", "emulator", 10.0, 20.0, "10% of calls for 10 s")
    window = Fault(**{**window.__dict__, "model": {"calls": 5, "faults": 1}})
    history = [
        msg("early", 5.0, "t0", 1),
        msg("a", 11.0, "t1", 2),
        msg("b", 12.0, error="upstream_error"),
        msg("b", 13.0, "t2", 3, attempt=1),
        msg("c", 14.0, "t3", 4),
        msg("d", 15.0, error="upstream_error"),
    ]
    report = check(history, [window], final(state()))
    text = render(report, [window], history)
    assert "3 of 4 messages sent in the window acknowledged (75.00%, after resends)" in text
    assert "took 5 calls and struck 1 faults for 3 turns" in text
    assert "amplification 1.250" in text
    silent = Fault("upstream-faults", "emulator", 10.0, 20.0)
    quiet = check(history, [silent], final(state()))
    assert "amplification" not in render(quiet, [silent], history)


def test_a_budget_overshoot_is_measured_against_one_call_per_turn_at_once() -> None:
    """Two sessions, the largest turn 300 tokens: the bound is 600. Passing a 1,000 budget by
    500 is within it; by 700 is a finding. The table says whether the budget was reached."""
    refused = Request("message", S, "k9", 0, 3.0, 3.1, 403, "quota_exceeded", content="message k9")
    history = [*CLEAN, refused]
    sessions = final(state(turn(1, "t1", "k1", tokens=300), turn(2, "t2", "k2", tokens=100)))
    within = FinalState(sessions.sessions, None, BudgetState(1_000, 1_500, 2))
    report = check(history, [], within)
    assert report.count("budget_overshoot") == 0
    assert report.budget == BudgetSummary(1_000, 1_500, 600, 1)
    assert "1500 tokens used of a 1000 tokens_per_day budget (+500; bound 600" in render(report, [])
    over = check(history, [], FinalState(sessions.sessions, None, BudgetState(1_000, 1_700, 2)))
    (finding,) = over.examples("budget_overshoot")
    assert "700 over, past the bound of 600 (2 turns at once x 300" in finding.detail
    unreached = check(CLEAN, [], within)
    assert "never reached" in render(unreached, [])
