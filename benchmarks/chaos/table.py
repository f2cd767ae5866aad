"""A chaos run's report as a table: one row per fault class (the findings placed in the window
of the fault they followed), with each class's count, the sessions it disturbed, and its worst
recovery time; and a line of totals. A fault that ran at the same time as another (the
schedule's mixed phase) has a row of its own, "(mixed)": its recovery is the pair's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .checker import Report, fault_kind_at
from .history import Fault, Request

METERING = ("unmetered", "metered_twice", "usage_short")
HEADER = (
    "| fault | count | sessions disturbed | lost | duplicated | order (stale) | seq | metering "
    "| recovery from start, worst (s) | from end (s) | not recovered |"
)


@dataclass
class Row:
    kind: str
    count: int = 0
    disturbed: int = 0
    lost: int = 0
    duplicated: int = 0
    order: int = 0
    seq: int = 0
    metering: int = 0
    recovery_s: float | None = None
    after_end_s: float | None = None
    unrecovered: int = 0

    def cells(self) -> list[str]:
        recovery, after_end = (
            "-" if s is None else f"{s:.1f}" for s in (self.recovery_s, self.after_end_s)
        )
        counted = [self.count, self.disturbed, self.lost, self.duplicated, self.order, self.seq]
        return [
            self.kind,
            *(str(n) for n in counted),
            str(self.metering),
            recovery,
            after_end,
            str(self.unrecovered),
        ]


def label(fault: Fault, faults: Sequence[Fault]) -> str:
    """The fault's kind, "(mixed)" when it overlapped another."""
    mixed = any(
        other is not fault
        and other.started_at <= fault.ended_at
        and fault.started_at <= other.ended_at
        for other in faults
    )
    return f"{fault.kind} (mixed)" if mixed else fault.kind


def rows(report: Report, faults: Sequence[Fault]) -> list[Row]:
    by_kind: dict[str, Row] = {}
    for fault in sorted(faults, key=lambda f: f.started_at):
        name = label(fault, faults)
        by_kind.setdefault(name, Row(name)).count += 1
    for recovery in report.recoveries:
        row = by_kind[label(recovery.fault, faults)]
        row.disturbed += recovery.disturbed
        row.unrecovered += recovery.unrecovered
        if recovery.recovery_s is not None:
            row.recovery_s = max(row.recovery_s or 0.0, recovery.recovery_s)
        if recovery.after_end_s is not None:
            row.after_end_s = max(row.after_end_s or 0.0, recovery.after_end_s)
    for finding in report.findings:
        if finding.check == "unresumable":
            continue  # a session's, after the run: the totals line says it
        kind = fault_kind_at(faults, finding.at, label)
        row = by_kind.setdefault(kind, Row(kind))
        if finding.check in METERING:
            row.metering += 1
        elif finding.check in ("lost", "duplicated", "order", "seq"):
            setattr(row, finding.check, getattr(row, finding.check) + 1)
    return list(by_kind.values())


def upstream(faults: Sequence[Fault], requests: Sequence[Request]) -> list[str]:
    """For each ``upstream-faults`` window, what the client got and what the model API paid:
    of the messages first sent in the window, the share acknowledged in the end (after the
    client's resends); and the calls the model API took against those it had to take: one per
    turn acknowledged in the window (the workload's turns make one call each) plus one per
    fault it struck (each failed call is retried once). Amplification above 1 is calls spent on
    nothing: a turn run again after its call had succeeded."""
    first_sent: dict[str, float] = {}
    acked_keys: set[str] = set()
    acked_at: list[float] = []
    for r in requests:
        if r.op != "message" or r.key is None or r.probe:
            continue
        first_sent[r.key] = min(first_sent.get(r.key, r.sent_at), r.sent_at)
        if r.acked:
            acked_keys.add(r.key)
            acked_at.append(r.answered_at)
    lines = []
    for fault in faults:
        if fault.kind != "upstream-faults" or not fault.model:
            continue
        start, end = fault.started_at, fault.ended_at
        sent = [k for k, at in first_sent.items() if start <= at <= end]
        acked = sum(1 for k in sent if k in acked_keys)
        turns = sum(1 for at in acked_at if start <= at <= end)
        calls, struck = fault.model.get("calls", 0), fault.model.get("faults", 0)
        needed = turns + struck
        share = f"{acked / len(sent):.2%}" if sent else "-"
        ratio = f"{calls / needed:.3f}" if needed else "-"
        lines.append(
            f"- upstream-faults ({fault.detail}): {acked} of {len(sent)} messages sent in the "
            f"window acknowledged ({share}, after resends); the model API took {calls} calls "
            f"and struck {struck} faults for {turns} turns acknowledged in the window: "
            f"amplification {ratio} (calls / (turns + faults))."
        )
    return lines


def render(report: Report, faults: Sequence[Fault], requests: Sequence[Request] = ()) -> str:
    """The table in Markdown, then the totals, the upstream-fault windows' success and
    amplification (given the ``requests``), and an example of each kind of finding."""
    lines = [HEADER, "|" + "---|" * 11]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows(report, faults)]
    resumable = report.sessions - report.count("unresumable")
    lines += [
        "",
        f"{report.sessions} sessions, {report.messages} messages ({report.attempts} requests "
        f"with resends and read-back), {report.acked} turns acknowledged, {report.failed} "
        f"messages never acknowledged; {resumable} of {report.sessions} sessions resumable.",
        *upstream(faults, requests),
    ]
    if report.budget is not None:
        b = report.budget
        reached = (
            f"{b.refused} messages refused with quota_exceeded"
            if b.refused
            else "never reached (the check is empty)"
        )
        lines.append(
            f"- budget: {b.used} tokens used of a {b.budget} tokens_per_day budget "
            f"({b.used - b.budget:+d}; bound {b.bound}: one call's worth per turn at once); "
            f"{reached}."
        )
    checks = sorted({f.check for f in report.findings})
    for name in checks:
        example = report.examples(name)[0]
        where = f" in {example.session_id}" if example.session_id else ""
        lines.append(f"- {name}: {report.count(name)}, e.g.{where}: {example.detail}")
    if not checks:
        lines.append("- no findings: nothing lost, duplicated, out of order or mis-metered.")
    return "\n".join(lines)
