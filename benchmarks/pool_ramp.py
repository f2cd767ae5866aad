"""One agent's pool through a ramp of sessions up and back down on the local Hypercore stand-in
cluster, recorded second by second.

The cluster is the autoscaler end-to-end test's (``tests/integration/autoscaling_cluster.py``): the
stand-in, a head that is itself a stand-in workload running autoscaler v2 with
``HypercoreNodeProvider`` (idle VMs go after 15 s), and CPU worker VMs with one VM slot each. The
API and its pool controller run in it as in the test (``tests/integration/pool_load.py``: pools
observed every 0.5 s, no warm pool). The agent's replicas take a VM each (``isolation: vm``, 4
sessions a replica, 1 to 2 replicas, cooldowns 1 s up and 3 s down), so the pool's second replica
is pending demand until the autoscaler has Spawned a VM for it.

The ramp: the agent is created (its first replica needs a VM too); a session is opened (and sent
its first message) every ``--step-s`` up to ``--peak``; all of them talk for ``--hold-s``; then
they are closed one per ``--step-s`` down to ``--survivors`` (the first opened and the last: one
on each replica), which go on talking until the pool is back at one replica and one VM; then
the agent is deleted and its last VM goes. About every second one JSON line goes to ``--out``:
``{"t", "phase", "sessions", "hosted", "desired", "ready", "starting", "draining", "vms"}``
(``t`` in seconds since the agent's creation; ``sessions`` open as the client holds them,
``hosted`` as the replicas count them; ``vms`` the cluster's worker workloads in Hypercore's List;
before the agent's creation answers and after its deletion, only ``vms`` is sampled).

    python -m benchmarks.pool_ramp [--peak 6] [--hold-s 10] [--out FILE] [--results]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import secrets
import shutil
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from benchmarks.results_file import commit, machine, write_section
from cluster.cli.servers import start_emulator
from hyperfleet.processes import free_port, reap_leftovers, stop
from tests.integration.autoscaling_cluster import (
    Driver,
    autoscaling_config,
    cluster_processes,
    start_head,
    start_standin_for,
)
from tests.integration.pool_load import (
    MAX_SESSIONS,
    PoolLoad,
    Sample,
    Talker,
    start_api,
    vm_agent_spec,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pool_ramp.jsonl"
SECTION = "### Pool ramp on the stand-in cluster"
IDLE_TIMEOUT_MINUTES = 0.25  # the autoscaler Stops a VM idle this long (the e2e test's)
SAMPLE_S = 1.0
WAIT_S = 180.0  # the most any phase waits for the pool or the autoscaler
CALL_TIMEOUT_S = 60.0


@dataclass
class Recorder:
    """Samples the pool every ``SAMPLE_S`` on a thread (its own HTTP client) into ``out``."""

    load: PoolLoad
    out: TextIO
    started: float = field(default_factory=time.monotonic)
    phase: str = "create"
    samples: list[tuple[str, Sample]] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self.started

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.events[phase] = self.now()

    def _run(self) -> None:
        with self.load.client() as http:
            while not self._stop.is_set():
                began = time.monotonic()
                sample = self.load.sample(self.now(), http)
                if sample is not None:
                    self.samples.append((self.phase, sample))
                    self.out.write(json.dumps({**sample.to_json(), "phase": self.phase}) + "\n")
                    self.out.flush()
                self._stop.wait(max(0.0, SAMPLE_S - (time.monotonic() - began)))

    def wait_for(self, check: Callable[[Sample], bool], what: str) -> bool:
        """Waits (at most ``WAIT_S``) for a sample taken from now on that passes ``check``."""
        since = self.now()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if any(s.t >= since and check(s) for _, s in self.samples[-5:]):
                return True
            time.sleep(SAMPLE_S / 4)
        print(f"gave up after {WAIT_S:.0f} s waiting for {what}", flush=True)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(CALL_TIMEOUT_S)


def ramp(load: PoolLoad, recorder: Recorder, args: argparse.Namespace) -> list[float]:
    """Runs the ramp; returns each session open's seconds (open and first message)."""
    load.create_agent(vm_agent_spec())
    recorder.wait_for(lambda s: s.ready == 1 and s.vms == 1, "the first replica on its VM")

    recorder.enter("up")
    opens = []
    for _ in range(args.peak):
        began = time.monotonic()
        load.open_session()
        opens.append(time.monotonic() - began)
        time.sleep(max(0.0, args.step_s - opens[-1]))
    recorder.enter("hold")
    with Talker(load, load.sessions):
        time.sleep(args.hold_s)
        recorder.wait_for(lambda s: s.ready >= 2, "a second ready replica")

    recorder.enter("down")
    # The survivors are the first sessions and the last: on the first replica and the second,
    # so that the one that drains has a session to move.
    first = (args.survivors + 1) // 2
    survivors = load.sessions[:first] + load.sessions[len(load.sessions) - args.survivors + first :]
    with Talker(load, survivors):
        for n, session_id in enumerate([s for s in load.sessions if s not in survivors]):
            time.sleep(args.step_s if n else 0.0)
            load.close_session(session_id)
        recorder.enter("drain")  # from the last close
        recorder.wait_for(
            lambda s: s.desired == s.ready == s.vms == 1 and not s.draining and not s.starting,
            "the pool back at one replica on one VM",
        )
    for session_id in load.sessions:
        load.send(session_id, "still there?")
    recorder.enter("delete")
    load.delete_agent()
    load.sessions.clear()
    recorder.wait_for(lambda s: s.vms == 0, "no worker VM")
    recorder.enter("end")
    time.sleep(SAMPLE_S * 1.5)  # one sample of the end
    return opens


def _first(
    samples: Sequence[tuple[str, Sample]], check: Callable[[Sample], bool], after: float = 0.0
) -> float | None:
    return next((s.t for _, s in samples if s.t >= after and check(s)), None)


def summary(recorder: Recorder, opens: list[float], load: PoolLoad) -> list[tuple[str, str]]:
    """(measurement, result) rows: when the pool and the autoscaler did what, from the samples
    (each good to about ``SAMPLE_S``)."""
    samples = recorder.samples
    events = recorder.events

    def at(t: float | None, since: float | None = None) -> str:
        if t is None:
            return "never"
        return f"t={t:.0f} s" + ("" if since is None else f" (+{t - since:.0f} s)")

    asked = _first(samples, lambda s: s.desired >= 2)
    vm = _first(samples, lambda s: s.vms >= 2)
    ready = _first(samples, lambda s: s.ready >= 2)
    down = events.get("drain")
    back = _first(
        samples,
        lambda s: s.desired == s.ready == 1 and not s.draining and not s.starting,
        down or 0.0,
    )
    vm_gone = _first(samples, lambda s: s.vms == 1, back or 0.0) if back is not None else None
    deleted = events.get("delete")
    none = _first(samples, lambda s: s.vms == 0, deleted or 0.0) if deleted is not None else None
    first_ready = _first(samples, lambda s: s.ready >= 1)
    peak = [
        max((getattr(s, k) for _, s in samples), default=0) for k in ("desired", "ready", "vms")
    ]
    held = [s for phase, s in samples if phase == "hold" and s.ready >= 2]
    hosted = "no sample"
    if held:
        low, high = min(s.hosted for s in held), max(s.hosted for s in held)
        hosted = f"{max(s.sessions for s in held)} / " + (
            f"{low}-{high}" if low < high else f"{low}"
        )
    failed = f"{len(load.failures)} of {load.requests}"
    if load.failures:
        failed += ": " + "; ".join(load.failures[:3])
    return [
        ("agent created -> its first replica ready on a new VM", at(first_ready, 0.0)),
        ("the pool asks for a second replica (desired 2)", at(asked, events.get("up"))),
        ("a second worker VM in Hypercore's List", at(vm, asked)),
        ("the replica on it ready", at(ready, asked)),
        ("slowest session open (open + first message)", f"{max(opens, default=0):.1f} s"),
        ("peak replicas desired / ready / worker VMs", " / ".join(map(str, peak))),
        ("sessions open / hosted by the replicas, both replicas ready", hosted),
        ("last close -> pool back at one ready replica, none draining", at(back, down)),
        ("... -> its VM Stopped (vms 1)", at(vm_gone, back)),
        ("agent deleted -> no worker VM", at(none, deleted)),
        ("failed requests", failed),
    ]


def section(rows: list[tuple[str, str]], command: str, elapsed_s: float, out: Path) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
    where = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    on = commit("autoscaling/", "serve_app/", "benchmarks/")
    intro = (
        f"`{command}` at {stamp}, on {on}: {elapsed_s:.0f} s on {machine()}. One agent "
        "(isolation vm: a replica per worker VM; 4 sessions a replica, 1-2 replicas) through a "
        "ramp of sessions up and down, on the Hypercore stand-in with autoscaler v2 and "
        "`HypercoreNodeProvider` (idle timeout 15 s), the pool ticking every 0.5 s. Times from "
        f"the agent's creation, sampled every {SAMPLE_S:g} s; the recording is `{where}`."
    )
    lines = [SECTION, "", textwrap.fill(intro, width=100, break_on_hyphens=False), ""]
    lines += ["| measurement | result |", "|---|---|", *(f"| {m} | {r} |" for m, r in rows)]
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path = RESULTS, today: str | None = None) -> None:
    """``text`` into RESULTS.md, in place of today's earlier run (``results_file``)."""
    write_section(text, path, today)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--peak", type=int, default=MAX_SESSIONS + 2, help="sessions at the top")
    parser.add_argument("--survivors", type=int, default=2, help="sessions left after the ramp")
    parser.add_argument("--step-s", type=float, default=1.0, help="between opens, and closes")
    parser.add_argument("--hold-s", type=float, default=10.0, help="time at the top")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON lines recording")
    parser.add_argument("--results", action="store_true", help="write into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not 0 < args.survivors < args.peak:
        parser.error("need 0 < --survivors < --peak")

    root = Path(tempfile.mkdtemp(prefix="hyperfleet-pool-ramp-"))
    name = "ramp" + uuid.uuid4().hex[:6]
    emulator_port = free_port()
    emulator_key = "sk-ant-bench-" + secrets.token_hex(6)
    emulator = start_emulator(emulator_port, emulator_key, root / "emulator.log")
    standin = start_standin_for(root)
    hypercore = standin.client()
    head = driver = load = recorder = None
    began = time.monotonic()
    try:
        config = autoscaling_config(
            standin, name, root, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES, max_workers=2
        )
        head = start_head(root, config)
        driver = Driver(head, root / "driver.log")
        driver.call("setup_store", CALL_TIMEOUT_S, path=str(root / "sessions.db"))
        workspaces = root / "workspaces"
        workspaces.mkdir(mode=0o711)
        api = start_api(driver, root, f"http://127.0.0.1:{emulator_port}", emulator_key, workspaces)
        print(f"cluster and API up in {time.monotonic() - began:.0f} s", flush=True)
        load = PoolLoad(api, hypercore, name)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as out:
            recorder = Recorder(load, out)
            try:
                opens = ramp(load, recorder, args)
            finally:
                recorder.close()
        rows = summary(recorder, opens, load)
        elapsed_s = time.monotonic() - began
        print("\n| measurement | result |\n|---|---|")
        print("\n".join(f"| {m} | {r} |" for m, r in rows))
        print(f"\nrecording: {args.out} ({len(recorder.samples)} samples)")
        if args.results:
            shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--results"]
            command = " ".join(["python -m benchmarks.pool_ramp", *shown])
            write_results(section(rows, command, elapsed_s, args.out))
            print(f"wrote {RESULTS}")
    finally:
        if load is not None:
            load.close()
        with contextlib.suppress(Exception):  # each step on its own: tear everything down
            if driver is not None:
                driver.close()
        with contextlib.suppress(Exception):
            if head is not None:
                head.stop()
        hypercore.close()
        standin.stop()
        reap_leftovers(cluster_processes(name))
        stop(emulator)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
