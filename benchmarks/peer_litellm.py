"""Hyperfleet beside LiteLLM's proxy: the latency and CPU each adds to the same load over the
model API alone (issue 16).

One run, one emulator: the stack's own (``hyperfleet up`` in a private ``HYPERFLEET_HOME`` on
ports of this benchmark's, ``PORTS``), at ``--ttft-ms`` to first token and ``--tps`` tokens a
second. LiteLLM's proxy (``benchmarks.litellm_proxy``: its own virtual environment, its
``/v1/messages`` route, a worker per core) routes the agent's model to that emulator. At each
``--clients`` value the same closed-loop load (``benchmarks.peer_load``: the same
conversations, ``--turns-per-session`` turns each, streaming) goes in turn (a) straight to the
emulator, (b) through LiteLLM's proxy and (c) through Hyperfleet's sessions (auth, rate limits,
routing to the agent's replica, the agent loop, the commit of every turn); each path warms up
for ``--warmup`` seconds, then is measured for ``--duration``.

Latency: per turn, from the request to the stream's end, and to the first text delta; "added"
is a path's p50 (p99) less (a)'s at the same client count. CPU: a thread samples every process
of the stack (by role, ``benchmarks.local_stack``) and LiteLLM's process tree over each measured
window; a path's CPU per request is that of the processes it goes through (a: the emulator; b:
the emulator and LiteLLM; c: the emulator and all of Hyperfleet's processes, its session opens
and closes included) over the requests that ended in the window, less what those processes
spend idle (measured for ``--idle-s`` before each client count) over as long; "over (a)"
subtracts (a)'s. The load generator's own CPU per request (the sampler's thread left out) and
event-loop lag (p99) say whether the client saturated: it shares the cores, and its lag is in
every latency it records.

    python -m benchmarks.peer_litellm [--clients 8,256] [--duration 60] [--warmup 15]
        [--turns-per-session 3] [--ttft-ms 500] [--tps 50] [--jitter 0] [--litellm-workers CORES]
        [--idle-s 10] [--out FILE] [--results]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path

import aiohttp
import psutil

from benchmarks import litellm_proxy
from benchmarks.local_stack import (
    REPO,
    SAMPLE_S,
    Sampler,
    StackPorts,
    admin_key,
    emulator_key,
    exit_on_sigterm,
    idle_rate,
    stack,
)
from benchmarks.peer_load import (
    Agent,
    HyperfleetPath,
    LoadPath,
    MessagesPath,
    SessionOpenError,
    Window,
    closed_loop,
    probe,
)
from benchmarks.peer_report import LITELLM_ROLE, PathResult, reading, table
from benchmarks.results_file import commit, machine, write_section
from cluster.loadtest.tenant import Provisioned, provision, release
from cluster.loadtest.users import Plan

DEFAULT_OUT = REPO / "benchmarks" / "results" / "peer_litellm.json"
SECTION = "### Beside LiteLLM's proxy: latency and CPU added over the model API"
# users_curve's ports, each +100: the two can run at once.
PORTS = StackPorts(
    api=8200,
    emulator=8290,
    ray=6585,
    redis=6590,
    dashboard=8465,
    prometheus=9290,
    grafana=3200,
)
LITELLM_PORT = 8250
MODEL = "claude-sonnet-5-5"  # AgentSpec's default, so the test agent's: LiteLLM routes it
ANTHROPIC_VERSION = "2023-06-01"
SETTLE_S = 3.0
SOURCES = tuple(
    f"benchmarks/{name}.py"
    for name in ("peer_litellm", "peer_load", "peer_report", "litellm_proxy", "local_stack")
)
SETUP_TIMEOUT_S = 60.0


async def _agent(http: aiohttp.ClientSession, provisioned: Provisioned) -> Agent:
    """The model, system prompt and max_tokens of the test's agent, as the API reports them."""
    target = provisioned.target
    async with http.get(
        f"{target.base_url}/v1/agents/{target.agent_id}",
        headers={"Authorization": f"Bearer {target.api_key}"},
        timeout=aiohttp.ClientTimeout(total=SETUP_TIMEOUT_S),
    ) as response:
        spec = await response.json()
    return Agent(str(spec["model"]), str(spec["system"]), int(spec["max_tokens"]))


def _paths(agent: Agent, home: Path, provisioned: Provisioned, proxy_key: str) -> list[LoadPath]:
    anthropic = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
    target = provisioned.target
    return [
        MessagesPath(
            "direct",
            PORTS.emulator_url + "/v1/messages",
            {**anthropic, "x-api-key": emulator_key(home)},
            agent,
        ),
        MessagesPath(
            "litellm",
            f"http://127.0.0.1:{LITELLM_PORT}{litellm_proxy.ROUTE}",
            {**anthropic, "Authorization": f"Bearer {proxy_key}"},
            agent,
        ),
        HyperfleetPath("hyperfleet", target.base_url, target.api_key, target.agent_id),
    ]


async def _measure_path(
    path: LoadPath,
    clients: int,
    args: argparse.Namespace,
    home: Path,
    extra: Sequence[tuple[psutil.Process, str]],
    idle: dict[str, float],
) -> PathResult:
    sampler = Sampler(home, extra)

    @contextlib.asynccontextmanager
    async def measured() -> AsyncIterator[object]:
        await asyncio.to_thread(sampler.__enter__)
        try:
            yield sampler
        finally:
            await asyncio.to_thread(sampler.__exit__, None, None, None)

    window: Window = await closed_loop(
        path, clients, args.turns_per_session, args.warmup, args.duration, measured
    )
    return PathResult.of(path.name, clients, window, sampler, idle)


async def _measure(
    args: argparse.Namespace, home: Path, proxy: psutil.Process, proxy_key: str
) -> list[PathResult]:
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    plan = Plan(
        users=max(counts),
        requests=args.turns_per_session,
        duration_s=args.warmup + args.duration,
        stream=True,
    )
    run_id = secrets.token_hex(4)
    extra = [(proxy, LITELLM_ROLE)]
    results: list[PathResult] = []
    async with aiohttp.ClientSession() as http:
        provisioned = await provision(http, PORTS.api_url, admin_key(home), plan, None, run_id)
        try:
            agent = await _agent(http, provisioned)
            if agent.model != MODEL:
                raise RuntimeError(f"the agent's model is {agent.model}; LiteLLM routes {MODEL}")
            for path in _paths(agent, home, provisioned, proxy_key):
                try:
                    turn = await probe(path)
                except SessionOpenError as e:
                    raise RuntimeError(f"{path.name}: no session opened: {e}") from e
                if not turn.ok:
                    raise RuntimeError(f"{path.name}: its first turn failed: {turn.error}")
            for clients in counts:
                await asyncio.sleep(SETTLE_S)
                idle = await asyncio.to_thread(idle_rate, home, args.idle_s, extra)
                for path in _paths(agent, home, provisioned, proxy_key):
                    result = await _measure_path(path, clients, args, home, extra, idle)
                    results.append(result)
                    print(table([result], [*results]).splitlines()[-1], file=sys.stderr, flush=True)
                    await asyncio.sleep(SETTLE_S)
        finally:
            for problem in await release(http, PORTS.api_url, admin_key(home), provisioned):
                print(f"cleanup: {problem}", file=sys.stderr)
    return results


def measure(args: argparse.Namespace, version: str) -> list[PathResult]:
    """Runs every client count's three paths on a stack and a LiteLLM proxy of their own."""
    emulator_flags = (
        f"--emulator-ttft-ms={args.ttft_ms:g}",
        f"--emulator-tps={args.tps:g}",
        f"--emulator-jitter={args.jitter:g}",
    )
    with tempfile.TemporaryDirectory(prefix="hyperfleet-peer-litellm-") as tmp:
        home = Path(tmp)
        with stack(home, PORTS, emulator_flags):
            key = litellm_proxy.master_key()
            config = home / "litellm.json"
            config.write_text(
                litellm_proxy.config(MODEL, PORTS.emulator_url, emulator_key(home), master_key=key)
            )
            log = home / "litellm.log"
            with litellm_proxy.proxy(config, LITELLM_PORT, args.litellm_workers, log) as child:
                print(
                    f"LiteLLM {version} on 127.0.0.1:{LITELLM_PORT}{litellm_proxy.ROUTE}, "
                    f"{args.litellm_workers} worker(s); stack in {home}",
                    file=sys.stderr,
                    flush=True,
                )
                results = asyncio.run(_measure(args, home, psutil.Process(child.pid), key))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="8,256", help="comma-separated")
    parser.add_argument("--duration", type=float, default=60.0, help="measured s per path")
    parser.add_argument("--warmup", type=float, default=15.0, help="s per path before it")
    parser.add_argument("--turns-per-session", type=int, default=3)
    parser.add_argument("--ttft-ms", type=float, default=500.0, help="the emulator's")
    parser.add_argument("--tps", type=float, default=50.0, help="the emulator's tokens/s")
    parser.add_argument("--jitter", type=float, default=0.0, help="the emulator's, 0 to 1")
    parser.add_argument(
        "--litellm-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="its Uvicorn workers (default: one per core, as Hyperfleet's ingress may use all)",
    )
    parser.add_argument("--litellm-version", default=litellm_proxy.VERSION)
    parser.add_argument(
        "--idle-s", type=float, default=10.0, help="idle CPU measured before each client count"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON result")
    parser.add_argument("--results", action="store_true", help="write into RESULTS.md")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    version = litellm_proxy.ensure_installed(args.litellm_version)
    print(f"LiteLLM {version} in {litellm_proxy.VENV}", file=sys.stderr, flush=True)
    results = measure(args, version)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": command,
                "litellm_version": version,
                "results": [asdict(r) for r in results],
            },
            indent=1,
        )
        + "\n"
    )
    rows = table(results, results)
    print(rows, reading(results), sep="\n\n")
    if args.results:
        write_section(
            f"{SECTION}\n\n`{f'python -m benchmarks.peer_litellm {command}'.strip()}` at "
            f"{commit(*SOURCES)}, on {machine()}; LiteLLM {version} (`litellm[proxy]`, its "
            f"`{litellm_proxy.ROUTE}` route, {args.litellm_workers} Uvicorn worker(s) on uvloop, "
            f"no database, `LITELLM_LOG=ERROR`). One emulator for all three paths, "
            f"{args.ttft_ms:g} ms to first token at {args.tps:g} tokens/s (jitter "
            f"{args.jitter:g}); closed loop, streaming, {args.turns_per_session} turns a "
            f"conversation, the same conversations on every path, each path {args.warmup:g} s "
            f"of warm-up then {args.duration:g} s measured, the paths in turn (a, b, c) at each "
            f"client count. (a) and (b) send the whole conversation each turn, as a Messages "
            f"API caller does; (c) opens a session and sends each message. Latency is the "
            f"request to the stream's end (Hyperfleet: its `turn_end`, after the commit) and "
            f"to the first text delta; added is over (a) at the same client count. CPU is each "
            f"path's processes' (user + system, sampled every {SAMPLE_S:g} s) over the "
            f"measured window per request ended in it, net of what they spend idle (gross in "
            f"brackets): (a) the emulator, (b) it and LiteLLM, (c) it and every Hyperfleet "
            f"process, session opens and closes included; over (a) subtracts (a)'s. The load "
            f"generator (one asyncio process) shares the cores: its CPU per request and "
            f"event-loop lag p99 are in the last column.\n\n{rows}\n\n{reading(results)}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
