"""The checker: pure functions from a chaos run's client history and the state read back after it
(``FinalState``) to a ``Report`` of what broke a promise, with examples.

What it counts, and from what:
- lost: an acknowledged turn (``history``) missing from its session's final transcript;
- duplicated: two acknowledged turns for one idempotency key, or one message's content twice in
  a transcript (each key carries its own content, so the same content twice is a resend that ran
  twice);
- order: transcript indices not 1..n with ``version == n``, an acknowledged index that differs
  from the transcript's, or two turns acknowledged one after the other in the opposite order in
  the transcript. A commit from a stale owner shows here (or as lost): the run cannot see the
  owner, only what it left;
- seq: a stream's event ids not going up by one (backwards or skipping), or an acknowledged
  stream starting at or below where the session's previous acknowledged stream ended;
- unmetered: a committed turn whose final usage record (``<turn id>:end``) the control store
  never metered; metered_twice: more turns counted in the usage table than final records metered
  (each record id counts once, so a surplus is a record counted twice); usage_short: fewer tokens
  in the usage table than the committed turns' own usage adds up to;
- unresumable: a session whose transcript could not be read, or that took no new message, after
  the run;
- budget_overshoot (a run with a day's token budget that runs out during it): the tokens the
  control store metered for the user past the budget, against the documented bound
  (``docs/admission.md``): one model call's worth per turn running at once, that is the
  sessions times the largest turn seen (the workload's turns make one call each);
- per fault, the recovery time: from its start (and from its end: a pause's resume, an outage's
  restart) to the first acknowledged turn of each session it disturbed (a request that failed,
  or one that stalled past ``STALL_S``, in the fault's window, which runs to the next fault's
  start); the fault's is the slowest session's.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .history import Fault, Request

STALL_S = 2.0
CHECKS = (
    "lost",
    "duplicated",
    "order",
    "seq",
    "unmetered",
    "metered_twice",
    "usage_short",
    "unresumable",
    "budget_overshoot",
)
EXAMPLES_MAX = 5


@dataclass(frozen=True)
class TurnSeen:
    """One turn of a final transcript: its index, id, the user message's text and its tokens."""

    index: int
    turn_id: str
    content: str | None
    tokens: int = 0


@dataclass(frozen=True)
class SessionState:
    session_id: str
    turns: tuple[TurnSeen, ...] | None  # None: the transcript could not be read
    version: int | None = None
    read_error: str | None = None
    resume_error: str | None = None  # the message sent after the run, None if acknowledged


@dataclass(frozen=True)
class MeterState:
    """What the control store metered: every record id it took (``metered_turns``), how many
    final records (``:end``) it took since the run began, and the run's user's usage rows."""

    metered_ids: frozenset[str]
    end_ids_in_run: int
    usage_turns: int
    usage_tokens: int


@dataclass(frozen=True)
class BudgetState:
    """A run under a day's token budget: the budget, the tokens metered for the run's user once
    its turns had settled (read before the budget was lifted for the read-back), and how many
    turns could run at once (its sessions)."""

    budget: int
    used: int
    concurrent: int


@dataclass(frozen=True)
class BudgetSummary:
    """What the table says of the budget: was it reached, by how much it was passed, the bound."""

    budget: int
    used: int
    bound: int
    refused: int  # messages the budget refused (403 quota_exceeded)


@dataclass(frozen=True)
class FinalState:
    sessions: dict[str, SessionState]
    meter: MeterState | None = None
    budget: BudgetState | None = None


@dataclass(frozen=True)
class Finding:
    check: str
    session_id: str | None
    at: float | None  # when the client saw what it is about (to place it in a fault's window)
    detail: str


@dataclass(frozen=True)
class Recovery:
    fault: Fault
    disturbed: int  # sessions that saw it
    recovery_s: float | None  # the slowest disturbed session's; None when none was disturbed
    unrecovered: int  # disturbed sessions that acknowledged nothing afterwards
    # The same, from the fault's end (a pause's SIGCONT, an outage's restart; a kill's start).
    after_end_s: float | None = None


@dataclass
class Report:
    sessions: int = 0
    attempts: int = 0
    messages: int = 0  # distinct idempotency keys sent
    acked: int = 0  # distinct turns acknowledged
    failed: int = 0  # keys never acknowledged
    findings: list[Finding] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    budget: BudgetSummary | None = None

    def count(self, check: str) -> int:
        return sum(f.check == check for f in self.findings)

    def ok(self) -> bool:
        return not self.findings

    def examples(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check][:EXAMPLES_MAX]


def check(requests: Sequence[Request], faults: Sequence[Fault], final: FinalState) -> Report:
    """Everything the history and the final state say against the platform's promises."""
    messages = [r for r in requests if r.op == "message"]
    by_session: dict[str, list[Request]] = defaultdict(list)
    for r in messages:
        if r.session_id is not None:
            by_session[r.session_id].append(r)
    keys = {(r.session_id, r.key) for r in messages if r.key is not None}
    acked_keys = {(r.session_id, r.key) for r in messages if r.acked}
    report = Report(
        sessions=len(final.sessions),
        attempts=len(requests),
        messages=len(keys),
        acked=len({r.turn_id for r in messages if r.acked}),
        failed=len(keys - acked_keys),
    )
    for session_id, sent in by_session.items():
        state = final.sessions.get(session_id)
        turns = state.turns if state is not None else None
        report.findings += lost(sent, turns)
        report.findings += duplicated(sent, turns)
        report.findings += order(sent, turns, state.version if state else None)
        report.findings += seq(sent)
    report.findings += unresumable(final.sessions.values())
    if final.meter is not None:
        report.findings += metering(final, messages)
    if final.budget is not None:
        report.budget, overshoot = budget(final, messages)
        report.findings += overshoot
    report.recoveries = recoveries(requests, faults)
    return report


def _acked(sent: Iterable[Request]) -> list[Request]:
    """Each acknowledged turn once (its first acknowledgement), in the order they came."""
    first: dict[str, Request] = {}
    for r in sorted((r for r in sent if r.acked and r.turn_id), key=lambda r: r.answered_at):
        first.setdefault(str(r.turn_id), r)
    return list(first.values())


def lost(sent: Sequence[Request], turns: Sequence[TurnSeen] | None) -> list[Finding]:
    if turns is None:
        return []  # unreadable: unresumable says so
    kept = {t.turn_id for t in turns}
    return [
        Finding("lost", r.session_id, r.answered_at, f"turn {r.turn_id} (key {r.key}) acked")
        for r in _acked(sent)
        if r.turn_id not in kept
    ]


def duplicated(sent: Sequence[Request], turns: Sequence[TurnSeen] | None) -> list[Finding]:
    findings = []
    by_key: dict[str, set[str]] = defaultdict(set)
    at: dict[str, float] = {}
    for r in _acked(sent):
        if r.key is not None and r.turn_id is not None:
            by_key[r.key].add(r.turn_id)
            at.setdefault(r.key, r.answered_at)
    for key, ids in by_key.items():
        if len(ids) > 1:
            session = sent[0].session_id
            findings.append(
                Finding("duplicated", session, at[key], f"key {key} acked as {sorted(ids)}")
            )
    if turns is None:
        return findings
    key_of = {r.content: r.key for r in sent if r.content is not None}
    counts: dict[str, list[int]] = defaultdict(list)
    for t in turns:
        if t.content is not None and t.content in key_of:
            counts[t.content].append(t.index)
    for text, indices in counts.items():
        sent_key = key_of[text]
        twice = sent_key is not None and len(by_key.get(sent_key, ())) > 1
        if len(indices) > 1 and not twice:
            findings.append(
                Finding(
                    "duplicated",
                    sent[0].session_id,
                    at.get(str(sent_key)),
                    f"key {sent_key}'s message committed as turns {indices}",
                )
            )
    return findings


def order(
    sent: Sequence[Request], turns: Sequence[TurnSeen] | None, version: int | None
) -> list[Finding]:
    if turns is None:
        return []
    session = sent[0].session_id if sent else None
    findings = []
    indices = [t.index for t in turns]
    if indices != list(range(1, len(turns) + 1)) or (version is not None and version != len(turns)):
        findings.append(
            Finding("order", session, None, f"transcript indices {indices}, version {version}")
        )
    index_of = {t.turn_id: t.index for t in turns}
    acked = _acked(sent)
    for r in acked:
        kept = index_of.get(str(r.turn_id))
        if kept is not None and r.index is not None and kept != r.index:
            findings.append(
                Finding(
                    "order",
                    session,
                    r.answered_at,
                    f"turn {r.turn_id} acked as index {r.index}, kept as {kept}",
                )
            )
    for a, b in itertools.pairwise(acked):
        ia, ib = index_of.get(str(a.turn_id)), index_of.get(str(b.turn_id))
        if a.answered_at <= b.sent_at and ia is not None and ib is not None and ia >= ib:
            findings.append(
                Finding(
                    "order",
                    session,
                    b.answered_at,
                    f"turn {b.turn_id} acked after {a.turn_id} but kept before it ({ib} <= {ia})",
                )
            )
    return findings


def _ids(r: Request) -> list[int | None]:
    # An error event may carry 0 when its replica no longer held the session: not a turn's event.
    return [s for kind, s in r.events if kind != "error"]


def seq(sent: Sequence[Request]) -> list[Finding]:
    findings = []
    streams = sorted((r for r in sent if r.events), key=lambda r: r.sent_at)
    for r in streams:
        ids = _ids(r)
        if any(s is None for s in ids):
            findings.append(Finding("seq", r.session_id, r.answered_at, "an event with no id"))
            continue
        for prev, cur in itertools.pairwise(ids):
            if prev is not None and cur is not None and cur != prev + 1:
                how = "backwards" if cur <= prev else "skipped"
                findings.append(
                    Finding("seq", r.session_id, r.answered_at, f"{how}: {prev} then {cur}")
                )
                break
    last: int | None = None
    for r in (r for r in streams if r.acked):
        numbered = [s for s in _ids(r) if s is not None]
        if not numbered:
            continue
        if last is not None and numbered[0] <= last:
            findings.append(
                Finding(
                    "seq",
                    r.session_id,
                    r.answered_at,
                    f"stream starts at {numbered[0]}, the previous acked one ended at {last}",
                )
            )
        last = max(last or 0, numbered[-1])
    return findings


def unresumable(sessions: Iterable[SessionState]) -> list[Finding]:
    findings = []
    for s in sessions:
        if s.turns is None or s.read_error is not None:
            findings.append(Finding("unresumable", s.session_id, None, f"read: {s.read_error}"))
        elif s.resume_error is not None:
            findings.append(
                Finding("unresumable", s.session_id, None, f"new message: {s.resume_error}")
            )
    return findings


def budget(final: FinalState, messages: Sequence[Request]) -> tuple[BudgetSummary, list[Finding]]:
    """The budget's summary, and a finding if the tokens used passed it by more than the
    bound (a budget never reached passes trivially: the summary's ``refused`` is 0)."""
    state = final.budget
    assert state is not None
    largest = max((t.tokens for s in final.sessions.values() for t in s.turns or ()), default=0)
    bound = state.concurrent * largest
    refused = len({r.key for r in messages if r.error == "quota_exceeded"})
    summary = BudgetSummary(state.budget, state.used, bound, refused)
    over = state.used - state.budget
    if over <= bound:
        return summary, []
    detail = (
        f"{state.used} tokens used of a {state.budget} budget: {over} over, past the bound "
        f"of {bound} ({state.concurrent} turns at once x {largest}, the largest turn)"
    )
    return summary, [Finding("budget_overshoot", None, None, detail)]


def metering(final: FinalState, messages: Sequence[Request]) -> list[Finding]:
    meter = final.meter
    assert meter is not None
    acked_at = {r.turn_id: r.answered_at for r in messages if r.acked}
    findings = []
    committed = [t for s in final.sessions.values() for t in s.turns or ()]
    for t in committed:
        if f"{t.turn_id}:end" not in meter.metered_ids:
            findings.append(
                Finding("unmetered", None, acked_at.get(t.turn_id), f"turn {t.turn_id}")
            )
    if meter.usage_turns > meter.end_ids_in_run:
        findings.append(
            Finding(
                "metered_twice",
                None,
                None,
                f"{meter.usage_turns} turns in the usage table, "
                f"{meter.end_ids_in_run} final records metered",
            )
        )
    tokens = sum(t.tokens for t in committed)
    if meter.usage_tokens < tokens:
        findings.append(
            Finding(
                "usage_short",
                None,
                None,
                f"{meter.usage_tokens} tokens metered, committed turns used {tokens}",
            )
        )
    return findings


def _windows(faults: Sequence[Fault]) -> list[tuple[Fault, float]]:
    """Each fault with the end of its window: the next fault's start (the last one's: never)."""
    ordered = sorted(faults, key=lambda f: f.started_at)
    ends = [f.started_at for f in ordered[1:]] + [math.inf] if ordered else []
    return [(f, max(e, f.ended_at)) for f, e in zip(ordered, ends, strict=True)]


def recoveries(requests: Sequence[Request], faults: Sequence[Fault]) -> list[Recovery]:
    messages = [r for r in requests if r.op == "message" and r.session_id is not None]
    result = []
    for fault, until in _windows(faults):
        disturbed: dict[str, float] = {}
        for r in messages:
            failed = not r.acked and fault.started_at <= r.answered_at < until
            stalled = (
                r.sent_at <= fault.ended_at
                and r.answered_at >= fault.started_at
                and r.answered_at - r.sent_at > STALL_S
            )
            if failed or stalled:
                sid = str(r.session_id)
                disturbed[sid] = min(disturbed.get(sid, r.answered_at), r.answered_at)
        slowest: float | None = None
        after_end: float | None = None
        unrecovered = 0
        for sid, since in disturbed.items():
            back = [
                r.answered_at
                for r in messages
                if r.session_id == sid and r.acked and r.answered_at >= since
            ]
            if not back:
                unrecovered += 1
                continue
            took = min(back) - fault.started_at
            slowest = took if slowest is None else max(slowest, took)
            late = max(0.0, min(back) - fault.ended_at)
            after_end = late if after_end is None else max(after_end, late)
        result.append(Recovery(fault, len(disturbed), slowest, unrecovered, after_end))
    return result


def fault_kind_at(
    faults: Sequence[Fault],
    at: float | None,
    name: Callable[[Fault, Sequence[Fault]], str] = lambda f, _: f.kind,
) -> str:
    """The kind (or ``name``) of the last fault started at or before ``at`` (whose window holds
    it): "no fault" before the first, "after the run" for a finding with no time."""
    if at is None:
        return "after the run"
    started = [f for f in faults if f.started_at <= at]
    return name(max(started, key=lambda f: f.started_at), faults) if started else "no fault"
