"""The agent pool's scaling policy against a simulated fleet, on seeded traces, next to Ray
Serve's and Knative's default policies and an oracle that knows the future.

    python -m benchmarks.autoscale_sim [--trace diurnal,azure] [--policy 80/30,ray-serve,knative]
        [--variant scale_down_at=0.5 ...] [--seed 1] [--json FILE] [--results]

The fleet. A replica hosts ``MAX_SESSIONS`` sessions; a session that arrives when the ready
replicas are full is refused and lost (no retry, and no wait: the ingress's ``capacity_wait_s``
is not modelled). Capacity is pooled: a session lands on any ready replica with room, and a
replica taken away moves its sessions to the others (one that cannot yet, the others being
full, drains and holds them, with its VM slot, until they fit). A starting replica holds
nothing. It starts on a VM of ``SLOTS_PER_VM`` slots (``isolation: shared`` replicas packing a
CPU VM; an ``isolation: vm`` agent's would take one each): with a free slot on a running VM it is
ready after a warm start, else a VM is added and the replica is ready when the VM is. Both are
lognormal around what ``benchmarks/RESULTS.md`` measured on 2026-11-25 (``hypercore_bench``):
warm median 0.35 s, sigma 0.15 (measured 0.28-0.40 s); new VM median 8.0 s, sigma 0.12
(measured 6.2-9.2 s). A VM with no replica for ``VM_IDLE_TIMEOUT_S`` goes (``cluster.yaml``'s
``idle_timeout_minutes: 5``); VMs are not capped. Replicas taken away are starting ones first,
then ready ones on the VMs with the fewest, so that VMs empty (as Ray Serve and a Kubernetes
ReplicaSet choose).

The controllers tick every ``TICK_S``. The pool policy sees hosted sessions, refusals and
ready, starting and draining replicas, as ``autoscaling/pool.py`` feeds it; Ray Serve's and
Knative's see the hosted sessions sampled each second, as their metrics pipelines do. Turns in
flight are not modelled (a turn runs inside a hosted session, so the pool policy's demand is
its sessions). Every policy starts from one ready replica at the trace's start, ``WARMUP_S``
before the measured window, and is bounded to ``[MIN_REPLICAS, MAX_REPLICAS]``.

The numbers, over the measured window only:
- refused time: the share of its seconds in which at least one session was refused; refused
  sessions; the worst burst: the longest run of consecutive seconds with refusals, and the
  sessions refused in it.
- replica-hours: replicas in existence (starting, ready, draining) over time; VM-hours too;
  mean utilisation: hosted sessions over the capacity of those replicas.
- oracle (a): the fewest replicas that hold the demand at 100 % at every moment,
  ``ceil(demand / MAX_SESSIONS)``; oracle (b): the fewest that keep it at or under the pool
  policy's ``scale_up_at`` (0.8), the headroom every policy here is asked to keep. Both know the
  future, start replicas instantly and never refuse; their demand counts refused sessions too.
  A policy that keeps 20 % headroom costs at least 1 / 0.8 = 1.25 x oracle (a) before any lag.
- actions: controller steps that changed the replica count (up / down); a flap is an action
  followed by one the other way within ``FLAP_WINDOW_S`` (the pool policy's scale-down
  cooldown, 300 s), counted per adjacent pair.
Targets (the issue): refused time <= 1 %, replica-hours <= 1.3 x the oracle's, no flaps.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import heapq
import itertools
import json
import math
import random
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Protocol

from autoscaling import Observation, PoolPolicy, PoolState, decide
from benchmarks import autoscale_traces
from benchmarks.autoscale_baselines import KnativeController, RayServeController
from benchmarks.autoscale_traces import Trace, demand_replica_s, lognormal
from benchmarks.results_file import commit, machine, write_section

MAX_SESSIONS = 100
TICK_S = 2  # the pool controller's period (PoolConfig.tick_s), and Knative's tick-interval
SLOTS_PER_VM = 4
WARM_START_S = (0.35, 0.15)  # lognormal median, sigma
NEW_VM_START_S = (8.0, 0.12)
VM_IDLE_TIMEOUT_S = 300.0
MIN_REPLICAS = 1
MAX_REPLICAS = 1000
FLAP_WINDOW_S = PoolPolicy().scale_down_cooldown_s
TARGET_REFUSED_SHARE = 0.01
TARGET_HOURS_RATIO = 1.3
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "### Pool autoscaling, simulated"
TARGETS = ("refused time", "replica-hours", "flaps")


class Controller(Protocol):
    name: str
    steps_on_refusal: bool  # a refusal with no replica starting is reported and steps at once

    def step(self, seen: Observation, now: float, samples: Sequence[int]) -> int:
        """The replicas (ready and starting) the pool should have from now on. ``samples``:
        hosted sessions at each whole second since the simulation started, the newest last."""
        ...


class PoolPolicyController:
    """Hyperfleet's policy, ``autoscaling.pool_policy.decide``, fed as the pool controller
    (``autoscaling/pool.py``) feeds it: a refusal is reported only when no replica is starting
    (one that is will serve the retry), and a reported refusal steps at once."""

    steps_on_refusal = True

    def __init__(self, policy: PoolPolicy | None = None, name: str = "80/30") -> None:
        self.policy = policy or PoolPolicy(min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS)
        self.name = name
        self.state = PoolState()

    def step(self, seen: Observation, now: float, samples: Sequence[int]) -> int:
        decision = decide(self.policy, self.state, seen, now)
        self.state = decision.state
        return decision.desired


POLICIES: dict[str, Callable[[], Controller]] = {
    "80/30": PoolPolicyController,
    "ray-serve": RayServeController,
    "knative": KnativeController,
}


@dataclass
class _Vm:
    ready_at: float
    replicas: int = 0
    idle_since: float | None = None


@dataclass
class _Replica:
    vm: int
    ready_at: float
    state: str = "starting"  # then ready, draining


class Fleet:
    """Replicas on VMs, with start times drawn from ``rng``."""

    def __init__(self, rng: random.Random, now: float, replicas: int) -> None:
        self.rng = rng
        self.vms: dict[int, _Vm] = {}
        self.replicas: dict[int, _Replica] = {}
        self.ready = self.starting = self.draining = 0
        self._starts: list[tuple[float, int]] = []  # (ready_at, replica), lazily cancelled
        self._ids = itertools.count()
        for _ in range(replicas):
            self._place(now, at_once=True)
        self.promote(now)

    def next_ready_at(self) -> float:
        while self._starts:
            replica = self.replicas.get(self._starts[0][1])
            if replica is not None and replica.state == "starting":
                return self._starts[0][0]
            heapq.heappop(self._starts)
        return math.inf

    def promote(self, now: float) -> None:
        """Starting replicas due by ``now`` become ready."""
        while self.next_ready_at() <= now:
            _, rid = heapq.heappop(self._starts)
            self.replicas[rid].state = "ready"
            self.starting -= 1
            self.ready += 1

    def start(self, now: float, count: int) -> None:
        for _ in range(count):
            self._place(now)

    def _place(self, now: float, at_once: bool = False) -> None:
        # The fullest running VM with a free slot, else a booting one, else a new VM.
        free = [
            (vm.ready_at > now, -vm.replicas, vid)
            for vid, vm in self.vms.items()
            if vm.replicas < SLOTS_PER_VM
        ]
        if free:
            booting, _, vid = min(free)
            vm = self.vms[vid]
            if booting:
                ready_at = vm.ready_at
            else:
                ready_at = now if at_once else now + lognormal(self.rng, *WARM_START_S)
        else:
            vid = next(self._ids)
            ready_at = now if at_once else now + lognormal(self.rng, *NEW_VM_START_S)
            vm = self.vms[vid] = _Vm(ready_at)
        vm.replicas += 1
        vm.idle_since = None
        rid = next(self._ids)
        self.replicas[rid] = _Replica(vid, ready_at)
        heapq.heappush(self._starts, (ready_at, rid))
        self.starting += 1

    def remove(self, now: float, count: int, hosted: int) -> None:
        """Take ``count`` replicas away: starting ones (the latest first), then ready ones on
        the VMs with the fewest replicas, which drain while their sessions do not fit."""
        starting = [(r.ready_at, rid) for rid, r in self.replicas.items() if r.state == "starting"]
        for _, rid in sorted(starting, reverse=True)[:count]:
            self.starting -= 1
            self._free(now, rid)
        for _ in range(count - min(count, len(starting))):
            ready = [
                (self.vms[r.vm].replicas, rid)
                for rid, r in self.replicas.items()
                if r.state == "ready"
            ]
            rid = min(ready)[1]
            self.replicas[rid].state = "draining"
            self.ready -= 1
            self.draining += 1
        self.settle(now, hosted)

    def settle(self, now: float, hosted: int) -> None:
        """Draining replicas whose sessions now fit on the ready ones go."""
        if not self.draining:
            return
        needed = max(0, math.ceil((hosted - self.ready * MAX_SESSIONS) / MAX_SESSIONS))
        for rid in [rid for rid, r in self.replicas.items() if r.state == "draining"]:
            if self.draining <= needed:
                break
            self.draining -= 1
            self._free(now, rid)

    def _free(self, now: float, rid: int) -> None:
        vm = self.vms[self.replicas.pop(rid).vm]
        vm.replicas -= 1
        if vm.replicas == 0:
            vm.idle_since = now

    def reap(self, now: float) -> None:
        """VMs idle for ``VM_IDLE_TIMEOUT_S`` go."""
        for vid, vm in list(self.vms.items()):
            if vm.idle_since is not None and now - vm.idle_since >= VM_IDLE_TIMEOUT_S:
                del self.vms[vid]


@dataclass
class Run:
    """One policy on one trace: the reported numbers."""

    trace: str
    policy: str
    seconds: int
    arrivals: int = 0
    refused_sessions: int = 0
    refused_seconds: int = 0
    refused_share: float = 0.0
    worst_burst_s: int = 0
    worst_burst_refused: int = 0
    replica_hours: float = 0.0
    vm_hours: float = 0.0
    peak_replicas: int = 0
    mean_utilisation: float = 0.0
    oracle_a_hours: float = 0.0
    oracle_b_hours: float = 0.0
    ratio_a: float = 0.0
    ratio_b: float = 0.0
    actions_up: int = 0
    actions_down: int = 0
    flaps: int = 0
    actions: list[tuple[float, int]] = field(default_factory=list)  # (time, +1 up / -1 down)

    def missed(self) -> list[str]:
        """The targets this run misses (replica-hours against oracle (b))."""
        refused, hours = (
            self.refused_share > TARGET_REFUSED_SHARE,
            self.ratio_b > TARGET_HOURS_RATIO,
        )
        return [n for n, bad in zip(TARGETS, (refused, hours, self.flaps > 0), strict=True) if bad]


def simulate(trace: Trace, controller: Controller, seed: int) -> Run:
    """Replay ``trace`` through ``controller`` on a fleet whose start times come from
    ``seed``. Deterministic: the same trace, controller and seed give the same run."""
    t0 = math.floor(trace.start_s / TICK_S) * TICK_S
    seconds = math.ceil(trace.end_s - t0)
    fleet = Fleet(random.Random(seed), float(t0), MIN_REPLICAS)
    arrivals, lengths = trace.arrivals_s, trace.lengths_s
    departures: list[float] = []
    samples: list[int] = []
    refused_per_s = [0] * seconds
    run = Run(trace.name, controller.name, seconds=math.ceil(trace.end_s))
    hosted = reported = i = 0
    held = [0.0, 0.0, float(t0)]  # replica-seconds, VM-seconds, until when

    def account(now: float) -> None:
        """What the fleet held since the last change, inside the window."""
        span = min(now, trace.end_s) - max(held[2], 0.0)
        replicas = fleet.ready + fleet.starting + fleet.draining
        if span > 0:
            held[0] += span * replicas
            held[1] += span * len(fleet.vms)
            run.peak_replicas = max(run.peak_replicas, replicas)
        held[2] = now

    def step(now: float) -> None:
        nonlocal reported
        account(now)
        counted = fleet.ready + fleet.starting
        seen = Observation(hosted, 0, reported, fleet.ready, fleet.starting, fleet.draining)
        desired = controller.step(seen, now, samples)
        reported = 0
        if desired > counted:
            fleet.start(now, desired - counted)
        elif desired < counted:
            fleet.remove(now, counted - desired, hosted)
        if desired != counted and 0 <= now < trace.end_s:
            run.actions.append((now, 1 if desired > counted else -1))

    for sec in range(seconds):
        boundary = t0 + sec + 1
        while True:  # this second's events, in time order
            arrival = arrivals[i] if i < len(arrivals) else math.inf
            departure = departures[0] if departures else math.inf
            ready_at = fleet.next_ready_at()
            at = min(arrival, departure, ready_at)
            if at >= boundary:
                break
            if ready_at == at:
                fleet.promote(at)
            elif departure == at:
                heapq.heappop(departures)
                hosted -= 1
            elif hosted < fleet.ready * MAX_SESSIONS:
                heapq.heappush(departures, arrival + lengths[i])
                hosted += 1
                i += 1
            else:
                i += 1
                refused_per_s[sec] += 1
                if not controller.steps_on_refusal:
                    reported += 1
                elif not fleet.starting:
                    reported += 1
                    step(arrival)
        samples.append(hosted)
        if boundary % TICK_S:
            continue
        step(float(boundary))
        fleet.settle(boundary, hosted)
        fleet.reap(boundary)
    account(trace.end_s)
    measured = refused_per_s[-t0:]
    run.arrivals = sum(1 for a in arrivals if 0 <= a < trace.end_s)
    run.refused_sessions = sum(measured)
    run.refused_seconds = sum(1 for r in measured if r)
    run.refused_share = run.refused_seconds / run.seconds
    run.worst_burst_s, run.worst_burst_refused = worst_burst(measured)
    run.replica_hours, run.vm_hours = held[0] / 3600, held[1] / 3600
    run.mean_utilisation = sum(samples[-t0:]) / (held[0] * MAX_SESSIONS) if held[0] else 0.0
    run.oracle_a_hours, run.oracle_b_hours = _oracles(trace)
    run.ratio_a = run.replica_hours / run.oracle_a_hours
    run.ratio_b = run.replica_hours / run.oracle_b_hours
    run.actions_up = sum(1 for _, d in run.actions if d > 0)
    run.actions_down = len(run.actions) - run.actions_up
    run.flaps = count_flaps(run.actions, FLAP_WINDOW_S)
    return run


@functools.cache
def _oracles(trace: Trace) -> tuple[float, float]:
    a, b = (
        demand_replica_s(trace, MAX_SESSIONS, u, MIN_REPLICAS)
        for u in (1.0, PoolPolicy().scale_up_at)
    )
    return a / 3600, b / 3600


def worst_burst(refused_per_s: Sequence[int]) -> tuple[int, int]:
    """The longest run of consecutive seconds with refusals, and the sessions refused in it
    (of equally long runs, the one that refused most)."""
    best = (0, 0)
    length = refused = 0
    for count in refused_per_s:
        length, refused = (length + 1, refused + count) if count else (0, 0)
        best = max(best, (length, refused))
    return best


def count_flaps(actions: Sequence[tuple[float, int]], window_s: float) -> int:
    """Adjacent actions ``(time, +1 up / -1 down)`` the opposite way within ``window_s``."""
    return sum(
        1 for (t1, d1), (t2, d2) in itertools.pairwise(actions) if d1 != d2 and t2 - t1 < window_s
    )


def table(runs: Sequence[Run]) -> str:
    lines = [
        "| trace | policy | refused time | refused sessions | replica-h | VM-h | oracle (a) h "
        "| x (a) | oracle (b) h | x (b) | mean util | actions (up/down) | flaps "
        "| worst refusal burst |",
        "|" + "---|" * 14,
    ]
    for r in runs:
        lines.append(
            f"| {r.trace} | {r.policy} | {r.refused_share * 100:.2f} % ({r.refused_seconds} s) "
            f"| {r.refused_sessions:,} of {r.arrivals:,} | {r.replica_hours:,.1f} "
            f"| {r.vm_hours:,.1f} | {r.oracle_a_hours:,.1f} | {r.ratio_a:.2f} "
            f"| {r.oracle_b_hours:,.1f} | {r.ratio_b:.2f} | {r.mean_utilisation * 100:.0f} % "
            f"| {len(r.actions)} ({r.actions_up}/{r.actions_down}) | {r.flaps} "
            f"| {r.worst_burst_s} s, {r.worst_burst_refused:,} refused |"
        )
    return "\n".join(lines)


WHY: dict[str, tuple[str, Callable[[Run], str]]] = {  # why its numbers, and the ones that show it
    "80/30": (
        "keeps what it adds until utilisation has stayed under 30 % for 300 s: the band's lower "
        "edge, not a default, sets its replica-hours (mean utilisation {})",
        lambda r: f"{r.mean_utilisation * 100:.0f} % on {r.trace}",
    ),
    "ray-serve": (
        "scales up after 30 s of wanting to, on metrics ~5 s old, refusing meanwhile (worst "
        "burst {}); it scales down after 600 s, but one step all the way",
        lambda r: f"{r.worst_burst_s} s on {r.trace}",
    ),
    "knative": (
        "reacts within a tick in panic, and scales down with no delay on a 60 s average, so "
        "noise across a replica boundary moves it both ways ({})",
        lambda r: f"{len(r.actions)} actions on {r.trace}",
    ),
}


def summary(runs: Sequence[Run]) -> list[str]:
    """Per trace: which policy wins on what, and which targets each misses; then why."""
    lines = []
    for trace in dict.fromkeys(r.trace for r in runs):
        group = [r for r in runs if r.trace == trace]
        fewest_refused = min(group, key=lambda r: (r.refused_share, r.refused_sessions))
        cheapest = min(group, key=lambda r: r.replica_hours)
        calmest = min(group, key=lambda r: (r.flaps, len(r.actions)))
        verdicts = [
            f"{r.policy} misses {', '.join(r.missed())}" if r.missed() else f"{r.policy} meets all"
            for r in group
        ]
        lines.append(
            f"- {trace}: fewest refusals {fewest_refused.policy}; fewest replica-hours "
            f"{cheapest.policy}; fewest flaps and actions {calmest.policy}. Targets (hours "
            f"against oracle (b)): {'; '.join(verdicts)}."
        )
    for policy, (why, shown) in WHY.items():
        values = ", ".join(shown(r) for r in runs if r.policy == policy)
        if values:
            lines.append(f"- {policy} {why.format(values)}.")
    headroom = {r.trace: r.oracle_b_hours / r.oracle_a_hours for r in runs}
    hot = [
        f"{r.policy} on {r.trace} ({r.ratio_a:.2f} x, {r.refused_sessions:,} sessions refused)"
        for r in runs
        if r.ratio_a <= TARGET_HOURS_RATIO
    ]
    lines.append(
        "- Oracle (b) over oracle (a), the price of the 20 % headroom alone: "
        + ", ".join(f"{h:.2f} x on {t}" for t, h in headroom.items())
        + f". {TARGET_HOURS_RATIO} x oracle (a) leaves ~5 % for lag and hysteresis: within it "
        + (", ".join(hot) if hot else "no run")
        + "; against oracle (b) the target is a fair one."
    )
    return lines


def parameters(seed: int, variants: Sequence[str]) -> dict[str, object]:
    names = "MAX_SESSIONS TICK_S SLOTS_PER_VM WARM_START_S NEW_VM_START_S VM_IDLE_TIMEOUT_S "
    names += "MIN_REPLICAS MAX_REPLICAS FLAP_WINDOW_S TARGET_REFUSED_SHARE TARGET_HOURS_RATIO"
    return {
        "seed": seed,
        "trace_seed": autoscale_traces.SEED,
        "warmup_s": autoscale_traces.WARMUP_S,
        "start_s": "lognormal (median, sigma)",
        **{name.lower(): globals()[name] for name in names.split()},
        "pool_policy": asdict(PoolPolicyController().policy),
        "variants": list(variants),
    }


def variant(spec: str) -> Callable[[], Controller]:
    """A pool policy with fields changed, from ``field=value[,field=value]``."""
    types = {f.name: f.type for f in fields(PoolPolicy)}
    changes: dict[str, float] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise ValueError(f"--variant {spec!r}: {key!r} is not a PoolPolicy field")
        changes[key] = int(value) if types[key] in ("int", int) else float(value)
    base = PoolPolicyController().policy
    policy = replace(base, **changes)  # type: ignore[arg-type]
    name = f"{policy.scale_up_at * 100:.0f}/{policy.scale_down_at * 100:.0f}"
    rest = [f"{k}={v}" for k, v in changes.items() if k not in ("scale_up_at", "scale_down_at")]
    return functools.partial(PoolPolicyController, policy, " ".join([name, *rest]))


def section(runs: Sequence[Run], command: str, elapsed_s: float) -> str:
    """The RESULTS.md subsection for these runs."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
    on = commit("autoscaling/pool_policy.py", "benchmarks/")
    lines = [
        SECTION,
        "",
        f"`{command}` at {stamp}, on {on}: {elapsed_s:.0f} s on {machine()}. The fleet "
        "model, the oracles and the baselines' defaults (with where they come from) are in "
        "`benchmarks/autoscale_sim.py`'s docstring, the traces in "
        "`benchmarks/autoscale_traces.py`'s. Targets: refused time <= "
        f"{TARGET_REFUSED_SHARE * 100:g} %, replica-hours <= {TARGET_HOURS_RATIO} x the "
        "oracle's, no flaps.",
        "",
        table(runs),
        "",
        *summary(runs),
    ]
    text = "\n".join(ln if ln.startswith("|") else _wrap(ln) for ln in lines)
    return text + "\n"


def _wrap(line: str) -> str:
    # A number and its unit stay on one line: textwrap breaks only at ASCII whitespace.
    kept = re.sub(r"(\d) (%|x\b|s\b)", "\\1\u00a0\\2", line)
    indent = "  " if line.startswith("- ") else ""
    wrapped = textwrap.fill(kept, width=100, subsequent_indent=indent, break_on_hyphens=False)
    return wrapped.replace("\u00a0", " ")


def write_results(text: str, path: Path = RESULTS, today: str | None = None) -> None:
    """``text`` into RESULTS.md, in place of today's earlier run (``results_file``)."""
    write_section(text, path, today)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--trace", default="diurnal,azure", help="comma-separated trace names")
    parser.add_argument("--policy", default=",".join(POLICIES), help="comma-separated policies")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="also run the pool policy with fields changed, e.g. scale_down_at=0.5 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the replica start times")
    parser.add_argument("--json", type=Path, help="write the numbers and parameters here")
    parser.add_argument("--results", action="store_true", help="write into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    traces = [t for t in args.trace.split(",") if t]
    names = [p for p in args.policy.split(",") if p]
    unknown = [t for t in traces if t not in autoscale_traces.GENERATORS]
    unknown += [p for p in names if p not in POLICIES]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    try:
        makers = [POLICIES[p] for p in names] + [variant(v) for v in args.variant]
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    started = time.perf_counter()
    runs = []
    for name in traces:
        trace = autoscale_traces.load(name)
        for make in makers:
            runs.append(simulate(trace, make(), args.seed))
            elapsed_s = time.perf_counter() - started
            print(f"{name} / {runs[-1].policy}: done at {elapsed_s:.0f} s", file=sys.stderr)
    elapsed_s = time.perf_counter() - started
    print(table(runs))
    print("\n".join(summary(runs)))
    if args.json:
        numbers = [{**asdict(r), "missed": r.missed()} for r in runs]
        document = {"parameters": parameters(args.seed, args.variant), "runs": numbers}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    if args.results:
        shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--results"]
        write_results(section(runs, " ".join(["python -m benchmarks.autoscale_sim", *shown]),
                              elapsed_s))  # fmt: skip
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
