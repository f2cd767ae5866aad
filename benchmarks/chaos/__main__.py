"""``python -m benchmarks.chaos``: a chaos run on a local stack of its own.

It starts ``hyperfleet up`` in a private ``HYPERFLEET_HOME`` on ports of its own (``PORTS``),
runs the workload and the seeded fault schedule (``run.py``), prints the schedule with its seed,
the checker's table and where the history file is, stops the stack, and with ``--results``
writes the table into ``benchmarks/RESULTS.md``. It exits 1 when the checker found anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.local_stack import StackPorts, admin_key, stack
from benchmarks.results_file import commit, machine, write_section
from cluster.loadtest.users import Target

from .faults import KINDS, Injector, StackDaemons, lasts_s, stack_workers
from .history import History
from .run import ChaosPlan, Control, run_chaos
from .schedule import describe, schedule
from .table import render

PORTS = StackPorts(
    api=8300,
    emulator=8390,
    ray=6685,
    redis=6690,
    dashboard=8565,
    prometheus=9390,
    grafana=3300,
)
# Turns take about half a second, so that a kill lands in some of them.
EMULATOR = ("--emulator-ttft-ms=200", "--emulator-tps=100", "--emulator-jitter=0.2")
SECTION = "### Chaos run: faults under load, and what the checker found"
REDIS_KINDS = tuple(k for k in KINDS if k != "session-store-kill")
SQLITE_KINDS = tuple(k for k in KINDS if k != "redis-restart")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--users", type=int, default=24, help="sessions, half of them streamed")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of load")
    parser.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated, of: {', '.join(KINDS)} (default: all but the other store's)",
    )
    parser.add_argument("--gap", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--pause", type=float, default=20.0, help="replica-pause, seconds")
    parser.add_argument("--outage", type=float, default=30.0, help="emulator-outage, seconds")
    parser.add_argument(
        "--upstream-window", type=float, default=20.0, help="upstream-faults, seconds"
    )
    parser.add_argument("--think-time", type=float, default=0.5, help="mean, seconds")
    parser.add_argument(
        "--sqlite", action="store_true", help="the stack without Redis (HYPERFLEET_REDIS=off)"
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="the run's user's tokens_per_day, to run out during the run: the checker measures "
        "the overshoot against its bound (lifted before the read-back)",
    )
    parser.add_argument("--results", action="store_true", help="write into RESULTS.md")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    default = SQLITE_KINDS if args.sqlite else REDIS_KINDS
    kinds = tuple(k for k in (args.faults or ",".join(default)).split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--faults: no {', '.join(unknown)}; the kinds: {', '.join(KINDS)}")
    home = Path(tempfile.mkdtemp(prefix="hyperfleet-chaos-"))

    def make(history: History, target: Target) -> Injector:
        return Injector(
            stack_workers(home),
            history.add,
            random.Random(seed),
            StackDaemons(home),
            pause_s=args.pause,
            outage_s=args.outage,
            upstream_window_s=args.upstream_window,
        )

    lasting = lasts_s(args.pause, args.outage, upstream_window_s=args.upstream_window)
    plan = schedule(seed, kinds, args.duration, args.gap, lasting)
    print(describe(seed, plan), flush=True)
    history_path = home / "history.jsonl"
    if args.sqlite:
        os.environ["HYPERFLEET_REDIS"] = "off"
    chaos = ChaosPlan(
        seed=seed,
        users=args.users,
        duration_s=args.duration,
        think_time_s=args.think_time,
        budget_tokens=args.budget,
    )
    history = History(history_path)
    try:
        with stack(home, PORTS, EMULATOR):
            report = asyncio.run(
                run_chaos(
                    PORTS.api_url,
                    admin_key(home),
                    chaos,
                    plan,
                    make,
                    history,
                    Control(home / "data" / "control.db"),
                    f"chaos{seed}",
                )
            )
    finally:
        history.close()
    table = render(report, history.faults(), history.requests())
    print(table)
    print(f"history: {history_path}")
    if args.results:
        command = " ".join(sys.argv[1:] if argv is None else argv)
        store = "SQLite session store" if args.sqlite else "Redis session store"
        # A run of another kind keeps its own section: the store, or a budget.
        title = SECTION + (" (SQLite session store)" if args.sqlite else "")
        title += ", under a token budget" if args.budget is not None else ""
        write_section(
            f"{title}\n\n`python -m benchmarks.chaos {command}`, seed {seed}, at "
            f"{commit('benchmarks/chaos')}, on {machine()}; the local stack ({store}), "
            f"{args.users} sessions (half streamed) for {args.duration:g} s, think time "
            f"{args.think_time:g} s, emulator TTFT 200 ms at 100 tokens/s; "
            f"{describe(seed, plan)}. Findings are placed in the window of the fault before "
            f"them; recovery is from a fault's start to the first acknowledged turn of each "
            f"session it disturbed (the slowest).\n\n{table}\n"
        )
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
