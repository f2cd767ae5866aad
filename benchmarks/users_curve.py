"""The users → latency curve of a local stack, with the CPU each process role spends per turn and
the memory each holds (issue 16's measurement).

It starts its own stack (``hyperfleet up`` in a private ``HYPERFLEET_HOME``, on ports of its own,
the emulator at 500 ms to first token and 50 tokens/s, ±20 %), runs ``hyperfleet loadtest``
closed-loop and streaming once per ``--users`` value, and stops the stack (``hyperfleet down``)
whatever happens (``benchmarks.local_stack``). During each run a thread samples every process
of the stack (the descendants of the daemons ``up`` recorded in ``$HYPERFLEET_HOME/run/``) every
``SAMPLE_S``: its role, from its command line or Ray's process title, its CPU seconds (user +
system) and its RSS. A role's CPU per turn is the growth of its processes' CPU seconds over the
run (a process born in the run counts from zero; one that exits counts up to its last sample)
divided by the completed turns; the load tester's own is its JSON's ``client.cpu_s``. The
headline figure is the steady window's: from a think time after the end of the ramp-up to the
end of ``--duration``, where the samples are cut (the report's ``started_at`` places its timeline on
the wall clock), so neither the replicas' starts nor the setup and cleanup are in it. The
marginal cost is the CPU rate's growth over the turn rate's from one point to the next.
RSS is the peak over the run's samples: by role, and the agent actors'
(their sum over the users, over the actor processes) per session and per replica.

The seed's criteria are p95 < 3 s, p99 < 10 s and success > 99 %; the "knee" is the largest
``--users`` value meeting them.

    python -m benchmarks.users_curve [--users 8,100,250,500,750,1000,1250] [--requests 10]
        [--think-time 30] [--ramp-up 60] [--duration 210] [--out FILE] [--results]
    python -m benchmarks.users_curve --from-json FILE [--results]   # render a saved run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.local_stack import (
    REPO,
    SAMPLE_S,
    Sampler,
    StackPorts,
    exit_on_sigterm,
    hyperfleet,
    stack,
)
from benchmarks.results_file import commit, machine, write_section

DEFAULT_OUT = REPO / "benchmarks" / "results" / "users_curve.json"
SECTION = "### Users → latency curve with CPU per turn by process"
PORTS = StackPorts(
    api=8100,
    emulator=8190,
    ray=6485,
    redis=6490,
    dashboard=8365,
    prometheus=9190,
    grafana=3100,
)
API_PORT = PORTS.api
EMULATOR = ("--emulator-ttft-ms=500", "--emulator-tps=50", "--emulator-jitter=0.2")
P95_MAX_S = 3.0
P99_MAX_S = 10.0
SUCCESS_MIN = 0.99
TESTER_LAG_MAX_MS = 50.0  # the load tester's own warning threshold
SETTLE_S = 5.0  # after a run, for the test agent's replicas to go
ATTEMPT_TIMEOUT_S = 60.0  # the load tester's per-attempt limit


@dataclass
class Point:
    """One ``--users`` value's run."""

    users: int
    exit_code: int
    completed: int = 0
    failed: int = 0
    success_rate: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    ttft_p50_s: float | None = None
    turns_per_s: float = 0.0
    sessions: int = 0
    loop_lag_p99_ms: float = 0.0
    tester_cpu_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    agent_actors: int = 0
    agents_rss_mb: float = 0.0
    sampler_cpu_s: float = 0.0
    # The steady state: from a think time past the ramp-up to the end of --duration.
    steady_s: float = 0.0
    steady_turns: int = 0
    steady_cpu_s: dict[str, float] = field(default_factory=dict)
    tester_share: float = 0.0  # of the tester's CPU, the steady window's (by its length)
    error: str = ""

    @property
    def meets(self) -> bool:
        return (
            self.exit_code in (0, 1)
            and self.success_rate > SUCCESS_MIN
            and self.p95_s is not None
            and self.p95_s < P95_MAX_S
            and self.p99_s is not None
            and self.p99_s < P99_MAX_S
        )

    def cpu_ms_per_turn(self) -> dict[str, float]:
        """By role, the load tester included, largest first."""
        spent = {**self.cpu_s, "load tester": self.tester_cpu_s}
        turns = max(self.completed, 1)
        per = {role: 1000.0 * s / turns for role, s in spent.items()}
        return dict(sorted(per.items(), key=lambda kv: -kv[1]))

    def steady_ms_per_turn(self) -> dict[str, float]:
        """By role over the steady window, the load tester included, largest first."""
        spent = {**self.steady_cpu_s, "load tester": self.tester_cpu_s * self.tester_share}
        turns = max(self.steady_turns, 1)
        per = {role: 1000.0 * s / turns for role, s in spent.items()}
        return dict(sorted(per.items(), key=lambda kv: -kv[1]))

    def steady_turns_per_s(self) -> float:
        return self.steady_turns / max(self.steady_s, 1e-9)

    def steady_cpu_per_s(self) -> float:
        """The stack's and the tester's CPU seconds a second over the steady window."""
        spent = sum(self.steady_cpu_s.values()) + self.tester_cpu_s * self.tester_share
        return spent / max(self.steady_s, 1e-9)

    @property
    def steady(self) -> bool:
        """Whether the point has a steady window (a run cut short, or shorter than its ramp-up
        and a think time, has none)."""
        return self.steady_turns > 0 and self.steady_s > 0

    def machine_busy(self) -> float:
        """The stack's and the tester's CPU as a share of every core: in the steady window, else
        over the whole run."""
        if self.steady:
            return self.steady_cpu_per_s() / (os.cpu_count() or 1)
        spent = sum(self.cpu_s.values()) + self.tester_cpu_s
        return spent / max(self.wall_s, 1e-9) / (os.cpu_count() or 1)


def run_point(home: Path, users: int, args: argparse.Namespace) -> Point:
    result = home / f"loadtest-{users}.json"
    argv = [
        "loadtest",
        f"--api-url=http://127.0.0.1:{API_PORT}",
        f"--users={users}",
        f"--requests={args.requests}",
        f"--think-time={args.think_time}",
        f"--ramp-up={args.ramp_up}",
        f"--timeout={ATTEMPT_TIMEOUT_S}",
        "--stream",
        "--quiet",
        f"--json={result}",
    ]
    if args.duration:
        argv.append(f"--duration={args.duration:g}")
    me = psutil.Process()
    mine_before = sum(me.cpu_times()[:2])
    with Sampler(home) as sampler:
        try:
            done = hyperfleet(home, *argv, timeout_s=run_timeout_s(args))
            code, error = done.returncode, done.stderr.strip()[-500:] if done.returncode > 1 else ""
        except subprocess.TimeoutExpired:
            code, error = 124, f"the load test ran past {run_timeout_s(args):.0f} s"
    point = Point(
        users=users,
        exit_code=code,
        error=error,
        wall_s=sampler.wall_s(),
        cpu_s=sampler.cpu_s(),
        peak_rss_mb=sampler.peak_rss_mb,
        agent_actors=sampler.agents_at_peak,
        agents_rss_mb=sampler.peak_agents_mb,
        sampler_cpu_s=sum(me.cpu_times()[:2]) - mine_before,
    )
    if result.exists() and code in (0, 1):
        report: dict[str, Any] = json.loads(result.read_text())

        def seconds(key: str) -> float | None:
            value = report.get(key)
            return None if value is None else value / 1000.0

        point.completed, point.failed = report["completed"], report["failed"]
        point.success_rate = report["success_rate"]
        point.p50_s, point.p95_s = seconds("median_e2el_ms"), seconds("p95_e2el_ms")
        point.p99_s, point.ttft_p50_s = seconds("p99_e2el_ms"), seconds("median_ttft_ms")
        point.turns_per_s = report["request_throughput"]
        point.sessions = report["sessions_opened"]
        point.loop_lag_p99_ms = report["client"]["loop_lag_p99_ms"]
        point.tester_cpu_s = report["client"]["cpu_s"]
        steady(point, report, sampler, args)
    time.sleep(SETTLE_S)
    return point


def run_timeout_s(args: argparse.Namespace) -> float:
    """How long one load test may take: its ramp-up and duration, the users' last think times
    (the longest of a thousand exponential ones is about 7.5 means), setup and cleanup."""
    if args.run_timeout_s:
        return float(args.run_timeout_s)
    run_s = args.ramp_up + (args.duration or args.requests * (args.think_time + 10.0))
    return run_s + 10.0 * args.think_time + 180.0


def steady(point: Point, report: dict[str, Any], sampler: Sampler, args: Any) -> None:
    """Fill ``point``'s steady window: from a think time after the ramp-up (the last users'
    first messages went out with no think before them) to ``--duration`` (else the run's
    end), while users send at their think time's pace and no replica starts."""
    zero = float(report.get("started_at") or 0.0)
    end_s = float(args.duration or report["duration"])
    begin_s = min(float(args.ramp_up) + float(args.think_time), end_s)
    if zero <= 0 or end_s <= begin_s:
        return
    point.steady_cpu_s, point.steady_s = sampler.cpu_between(zero + begin_s, zero + end_s)
    point.steady_turns = sum(
        b["completed"] for b in report["timeline"] if begin_s <= b["second"] < end_s
    )
    point.tester_share = (end_s - begin_s) / max(float(report["duration"]), 1e-9)


def marginal_ms(points: Sequence[Point], i: int) -> float | None:
    """CPU per extra turn from point ``i - 1`` to ``i``: the growth of the CPU rate over the
    growth of the turn rate in the steady windows (what a turn costs, idle work apart)."""
    if i == 0 or not (points[i - 1].steady and points[i].steady):
        return None
    a, b = points[i - 1], points[i]
    d_turns = b.steady_turns_per_s() - a.steady_turns_per_s()
    if d_turns <= 0.5:
        return None
    return 1000.0 * (b.steady_cpu_per_s() - a.steady_cpu_per_s()) / d_turns


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def curve_table(points: Sequence[Point], top: int = 4, mark_knee: bool = True) -> str:
    rows = [
        "| users | done | failed | success | p50 s | p95 s | p99 s | TTFT p50 s | steady turns/s "
        "| tester lag p99 ms | machine CPU | CPU ms/turn steady (whole run) | marginal ms/turn "
        "| top roles, steady CPU ms/turn |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, p in enumerate(points):
        per = p.steady_ms_per_turn() if p.steady else {}
        roles = ", ".join(f"{role} {ms:.1f}" for role, ms in list(per.items())[:top]) or "-"
        steady_ms = f"{sum(per.values()):.0f}" if per else "-"
        rate = f"{p.steady_turns_per_s():.2f}" if p.steady else "-"
        mark = " **knee**" if mark_knee and p is knee(points) else ""
        extra = marginal_ms(points, i)
        rows.append(
            f"| {p.users}{mark} | {p.completed} | {p.failed} | {100 * p.success_rate:.1f} % "
            f"| {_s(p.p50_s)} | {_s(p.p95_s)} | {_s(p.p99_s)} | {_s(p.ttft_p50_s)} "
            f"| {rate} | {p.loop_lag_p99_ms:.1f} "
            f"| {100 * p.machine_busy():.0f} % "
            f"| {steady_ms} ({sum(p.cpu_ms_per_turn().values()):.0f}) "
            f"| {'-' if extra is None else f'{extra:.0f}'} | {roles} |"
            + (f" exit {p.exit_code}: {p.error[:80]}" if p.error else "")
        )
    return "\n".join(rows)


def rss_table(points: Sequence[Point], top: int = 4) -> str:
    rows = [
        "| users | stack RSS MB | agent actors MB (processes) | per session MB | per replica MB "
        "| ingress MB | largest other roles, MB |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        others = sorted(
            ((r, mb) for r, mb in p.peak_rss_mb.items() if r not in ("agent actors",)),
            key=lambda kv: -kv[1],
        )
        rows.append(
            f"| {p.users} | {sum(p.peak_rss_mb.values()):.0f} "
            f"| {p.agents_rss_mb:.0f} ({p.agent_actors}) "
            f"| {p.agents_rss_mb / max(min(p.users, p.sessions), 1):.1f} "
            f"| {p.agents_rss_mb / max(p.agent_actors, 1):.0f} "
            f"| {p.peak_rss_mb.get('ingress replica', 0.0):.0f} "
            f"| {', '.join(f'{r} {mb:.0f}' for r, mb in others[:top])} |"
        )
    return "\n".join(rows)


def knee(points: Sequence[Point]) -> Point | None:
    """The largest users value meeting the seed's criteria."""
    return max((p for p in points if p.meets), key=lambda p: p.users, default=None)


def reading(points: Sequence[Point]) -> str:
    at = knee(points)
    where = (
        f"The seed's criteria (p95 < {P95_MAX_S:.0f} s, p99 < {P99_MAX_S:.0f} s, success > "
        f"{100 * SUCCESS_MIN:.0f} %) hold up to {at.users} users"
        if at
        else "The seed's criteria hold at none of the users values"
    )
    beyond = next((p for p in points if not p.meets and (at is None or p.users > at.users)), None)
    if beyond is not None:
        where += (
            f"; at {beyond.users} p95 is {_s(beyond.p95_s)} s (success "
            f"{100 * beyond.success_rate:.1f} %), the machine's cores "
            f"{100 * beyond.machine_busy():.0f} % busy"
        )
    lagging = [p.users for p in points if p.loop_lag_p99_ms > TESTER_LAG_MAX_MS]
    if lagging:
        where += (
            f". The load tester's event loop lagged past {TESTER_LAG_MAX_MS:.0f} ms (p99) at "
            f"{', '.join(map(str, lagging))} users: it shares the cores, and those latencies "
            f"include its own delay"
        )
    windowed = [p for p in points if p.steady]
    if len(windowed) < 2:
        return f"{where}. Fewer than two points have a steady window: no CPU comparison."
    first, last = windowed[0], windowed[-1]
    ratio = sum(last.steady_ms_per_turn().values()) / max(
        sum(first.steady_ms_per_turn().values()), 1e-9
    )
    margins = [m for i in range(len(points)) if (m := marginal_ms(points, i)) is not None]
    top_last = ", ".join(f"{r} {ms:.1f}" for r, ms in list(last.steady_ms_per_turn().items())[:3])
    cores = os.cpu_count() or 1
    spend = sum(last.steady_ms_per_turn().values())
    return (
        f"{where}. In the steady state CPU per turn at {last.users} users is {ratio:.2f} times "
        f"that at {first.users} (the issue asks for at most 1.5 times from 8 to 1,000); at "
        f"{first.users} users the stack's idle work, spread over few turns, is most of it, so "
        f"the ratio says little. The marginal cost, the CPU rate's growth over the turn "
        f"rate's from one point to the next, is the measure of what grows: "
        + (", ".join(f"{m:.0f}" for m in margins) + " ms a turn" if margins else "none")
        + f". At {last.users} users a turn costs {spend:.0f} ms ({top_last}), so {cores} cores "
        f"serve about {1000 * cores / max(spend, 1e-9):.0f} turns a second when every cycle "
        f"goes to turns."
    )


def measure(args: argparse.Namespace) -> list[Point]:
    """Runs the curve on a stack of its own."""
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="hyperfleet-users-curve-") as tmp:
        home = Path(tmp)
        with stack(home, PORTS, EMULATOR):
            for n in (int(u) for u in args.users.split(",") if u.strip()):
                point = run_point(home, n, args)
                points.append(point)
                print(
                    curve_table([point], mark_knee=False).splitlines()[-1],
                    file=sys.stderr,
                    flush=True,
                )
    return points


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="8,100,250,500,750,1000,1250", help="comma-separated")
    parser.add_argument("--requests", type=int, default=10, help="messages per session")
    parser.add_argument("--think-time", type=float, default=30.0, help="mean, seconds")
    parser.add_argument("--ramp-up", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--duration", type=float, default=210.0, help="seconds a run lasts (0: --requests)"
    )
    parser.add_argument(
        "--run-timeout-s",
        type=float,
        default=None,
        help="per load test (default: its ramp-up, duration and 10 think times, plus 3 minutes)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON result")
    parser.add_argument("--results", action="store_true", help="write into RESULTS.md")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="render a saved --out file; run nothing"
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        points = [
            Point(**{k: v for k, v in p.items() if k in Point.__dataclass_fields__})
            for p in saved["points"]
        ]
        command, args.requests = saved["command"], saved["requests"]
        args.think_time, args.ramp_up = saved["think_time"], saved["ramp_up"]
        args.duration = saved.get("duration", 0)
    else:
        points = measure(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "command": command,
                    "requests": args.requests,
                    "think_time": args.think_time,
                    "ramp_up": args.ramp_up,
                    "duration": args.duration,
                    "knee_users": (k.users if (k := knee(points)) else None),
                    "points": [
                        {**asdict(p), "meets": p.meets, "cpu_ms_per_turn": p.cpu_ms_per_turn()}
                        for p in points
                    ],
                },
                indent=1,
            )
            + "\n"
        )
    curve, memory = curve_table(points), rss_table(points)
    print(curve, memory, reading(points), sep="\n\n")
    if args.results:
        write_section(
            f"{SECTION}\n\n`{f'python -m benchmarks.users_curve {command}'.strip()}`"
            f" at {commit('benchmarks/users_curve.py')}, on {machine()}; "
            f"emulator TTFT 500 ms at 50 tokens/s (±20 %), closed loop, streaming, "
            f"up to {args.requests} messages a session, think time {args.think_time:g} s, "
            f"ramp-up {args.ramp_up:g} s, {args.duration or 0:g} s a run. Latency and "
            f"success are over the whole run, the ramp-up included. CPU is every stack "
            f"process's (user + system, sampled every {SAMPLE_S:g} s) plus the load tester's, "
            f"per completed turn in the steady window (from a think time after the ramp-up to "
            f"the end of the run's duration: no replica starts, users at their think time's "
            f"pace), and "
            f"in brackets over the whole run with its setup and cleanup; machine CPU is the "
            f"steady window's over all the cores; RSS is the peak over the run.\n\n"
            f"{curve}\n\n{memory}\n\n{reading(points)}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
