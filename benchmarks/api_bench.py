"""The HTTP API's cost over a bare Serve path, and Serve's default proxy against HAProxy mode.

For each proxy mode it starts a fresh Ray head (HAProxy mode: ``RAY_SERVE_ENABLE_HA_PROXY=1`` and
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the cluster's environment), then measures, with N
keep-alive clients for D seconds each:
- ``echo``: a bare deployment answering a constant (the proxy's own ceiling);
- ``baseline``: a bare deployment forwarding to one actor that calls the emulator (streaming,
  reading the raw events as the agent loop does), no auth, no session, no commit. Its clients
  hold their conversations and send each whole, as a bare Messages API's callers do, so the
  model reads the same prompts on both paths and the difference is the platform's own work;
- ``full``: ``POST /v1/sessions/{id}/messages`` through Hyperfleet's ingress (auth, rate limits,
  quota reservation, routing, the replica's session and loop, the fenced commit, usage), once
  with each admission gate: ``actor`` (the control-store actor and the SQLite session-store
  actor, no Redis) and ``redis`` (admission in the ingress, limits and budgets in Redis, turns
  committed to the Redis session store).
Each ``full`` path is measured in ``--rounds`` slices alternating with the baseline's (ABBA...),
and both are pooled over their slices: on a shared 2-core machine the speed drifts within a
run, and one baseline measured before everything else let the drift set the ratio (the same
code gave 55 % to 100 % of the baseline across runs). The emulator has zero latency by default,
so the numbers are the platform's own costs, and 8 clients keep the 2 cores busy: p50 is then
mostly queueing, clients / throughput. ``--ttft-ms`` gives the model a time to first token, as
a real one has, and measures the latency added at that concurrency without a saturated CPU.
Each client holds conversations of ``--turns-per-session`` turns (then moves to its next
session): a session's history is resent on every turn, so one endless conversation would
measure the emulator's cost of ever longer prompts rather than the platform's.

``--metrics on,off`` measures what the in-Ray metrics cost: each gate's API is deployed twice,
at ``/`` with metrics and at ``/off`` with ``HYPERFLEET_METRICS=0`` in its ingress replicas'
environment (its agent's replicas inherit it), and ``full/on`` and ``full/off`` take turns with
the baseline in the same rounds.

    python -m benchmarks.api_bench [--clients 8] [--seconds 10] [--modes default,haproxy]
                                   [--turns-per-session 5] [--rounds 4] [--cpu] [--ttft-ms 0]
                                   [--gates actor,redis] [--metrics on|off|on,off]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.cli.servers import LOOPBACK_RAY_ENV

KEY = "sk-ant-bench"
# Where each metrics setting's API is deployed (``--metrics``), and the switch's environment.
PREFIXES = {"on": "", "off": "/off"}
METRICS_OFF_ENV = {"env_vars": {"HYPERFLEET_METRICS": "0"}}
SESSIONS_PER_CLIENT = 40
BODY = {"content": "What is the status of the fleet?"}


def _process_group(cmdline: list[str], name: str) -> str:
    """A readable group for a process: Ray's title, the ``-m`` module, or the executable."""
    if cmdline and cmdline[0].startswith("ray::"):
        title = cmdline[0].removeprefix("ray::").split()[0]
        if ":AgentActor" in title:
            return "AgentActor"
        return title.split(".")[0].removeprefix("ServeReplica:")
    if "-m" in cmdline[:-1]:
        module = cmdline[cmdline.index("-m") + 1]
        return module + (" " + cmdline[cmdline.index("-m") + 2] if module == "cluster.cli" else "")
    return name


def _cpu_by_group() -> dict[str, float]:
    """CPU seconds used so far by every process on the machine, by ``_process_group``."""
    import psutil  # Ray's vendored copy, on sys.path once ray is imported

    used: dict[str, float] = {}
    for process in psutil.process_iter(["cmdline", "name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is None:
            continue
        group = _process_group(process.info["cmdline"] or [], process.info["name"] or "?")
        used[group] = used.get(group, 0.0) + times.user + times.system
    return used


class Conversations:
    """The baseline's conversations, held by its clients as a bare Messages API's callers hold
    theirs: each turn sends the whole history, as the full path's replica does for a session.
    Keyed as ``full``'s session pools are, so both paths send the same conversations."""

    def __init__(self, turns: int) -> None:
        self._turns = turns
        self._history: dict[tuple[int, int], list[dict[str, Any]]] = {}

    def _key(self, client: int, i: int) -> tuple[int, int]:
        return client, (i // self._turns) % SESSIONS_PER_CLIENT

    def ask(self, client: int, i: int) -> list[dict[str, Any]]:
        history = self._history.setdefault(self._key(client, i), [])
        return [*history, {"role": "user", "content": BODY["content"]}]

    def answered(self, client: int, i: int, content: list[dict[str, Any]]) -> None:
        history = self._history.setdefault(self._key(client, i), [])
        history += [
            {"role": "user", "content": BODY["content"]},
            {"role": "assistant", "content": content},
        ]


def _worker_main(
    mode: str,
    clients: int,
    seconds: float,
    turns: int,
    rounds: int,
    cpu: bool,
    ttft_ms: float,
    work: str,
    gates: list[str],
    metrics: list[str],
) -> None:
    """Runs in a fresh process per proxy mode: Ray reads the HAProxy flags at start."""
    import aiohttp
    import anthropic
    import httpx
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from actors import start_store_actor
    from cluster.cli.servers import start_emulator, start_ray_head, start_redis
    from hyperfleet.processes import free_port, stop
    from serve_app import APP_NAME, build, start_control_actor
    from serve_app.deployment import Ingress

    work_dir = Path(work)
    emulator_port, ray_port, http_port, redis_port = (free_port() for _ in range(4))
    latency = ["--ttft-ms", str(ttft_ms)]
    processes = [start_emulator(emulator_port, KEY, work_dir / f"emu-{mode}.log", *latency)]
    redis_dir = work_dir / f"redis-{mode}"
    redis_dir.mkdir()
    processes.append(start_redis(redis_port, redis_dir))
    processes.append(start_ray_head(ray_port, work_dir / f"ray-{mode}.log", num_cpus=16))
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        ray.init(address=f"127.0.0.1:{ray_port}", namespace="hyperfleet", log_to_driver=False)
        store = start_store_actor(work_dir / f"s-{mode}.db")
        ray.get(store.ping.remote(), timeout=60)

        @ray.remote(num_cpus=0)
        class Caller:
            def __init__(self) -> None:
                self.client = anthropic.AsyncAnthropic(base_url=emulator_url, api_key=KEY)

            async def call(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
                # The raw event stream, as the agent loop reads it (actors/reply.py): the SDK's
                # messages.stream helper would cost this baseline ~2.5 ms more CPU per call and
                # flatter the full path.
                stream = await self.client.messages.create(
                    model="claude-sonnet-5-5",
                    max_tokens=4096,  # an agent's default, as the full path's agent has
                    messages=messages,
                    stream=True,
                )
                text_parts: list[str] = []
                usage: dict[str, Any] = {}
                async for event in stream:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text_parts.append(event.delta.text)
                    elif event.type == "message_delta":
                        usage = event.usage.model_dump()
                return {"content": [{"type": "text", "text": "".join(text_parts)}], "usage": usage}

        _caller = Caller.options(name="baseline-caller", lifetime="detached").remote()

        @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25})
        class Baseline:
            def __init__(self) -> None:
                self.caller = ray.get_actor("baseline-caller", namespace="hyperfleet")

            async def __call__(self, request: Request) -> JSONResponse:
                body = await request.json()
                return JSONResponse(await self.caller.call.remote(body["messages"]))

        @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25})
        class Echo:
            async def __call__(self, request: Request) -> JSONResponse:
                return JSONResponse({"ok": True})

        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(Baseline.bind(), name="baseline", route_prefix="/baseline")
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        base = f"http://127.0.0.1:{http_port}"

        def deploy(gate: str) -> tuple[dict[str, str], dict[str, list[list[str]]]]:
            """The API with one gate (once per ``metrics`` setting, at its prefix); a user, and
            per setting an agent and each client's pool of sessions."""
            for name in ("control-store",):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace="hyperfleet"), no_restart=True)
            time.sleep(1.0)
            control = start_control_actor(
                work_dir / f"c-{mode}-{gate}.db", redis_url if gate == "redis" else None
            )
            ray.get(control.ping.remote(), timeout=60)
            quotas = {"requests_per_minute": 10**7, "max_sessions": 10**6}
            ray.get(control.create_user.remote("usr_b", "bench", quotas))
            user_key = ray.get(control.issue_key.remote("usr_b")).api_key
            runtime: dict[str, Any] = {"anthropic_base_url": emulator_url, "anthropic_api_key": KEY}
            config: dict[str, Any] = {"runtime": runtime, "ip_requests_per_minute": 10**7}
            if gate == "redis":
                config = {**config, "redis_url": redis_url}
                runtime["store_url"] = redis_url
            headers = {"Authorization": f"Bearer {user_key}"}
            pools: dict[str, list[list[str]]] = {}
            for setting in metrics:
                prefix = PREFIXES[setting]
                app = build(config, num_replicas=2)
                if setting == "off":
                    app = Ingress.options(  # type: ignore[attr-defined]
                        num_replicas=2,
                        autoscaling_config=None,
                        ray_actor_options={"num_cpus": 0.25, "runtime_env": METRICS_OFF_ENV},
                    ).bind(config)
                serve.run(app, name=APP_NAME + prefix.replace("/", "-"), route_prefix=prefix or "/")
                with httpx.Client(base_url=base + prefix, headers=headers, timeout=60) as http:
                    agent = http.post("/v1/agents", json={"max_sessions": 1000}).json()
                    pools[setting] = [
                        [
                            http.post(f"/v1/agents/{agent['id']}/sessions").json()["id"]
                            for _ in range(SESSIONS_PER_CLIENT)
                        ]
                        for _ in range(clients)
                    ]
            return headers, pools

        class Measured:
            """One measured path: its latencies and timed seconds, pooled over its rounds."""

            def __init__(
                self,
                name: str,
                path_of: Any,
                headers: dict[str, str] | None,
                conversations: Conversations | None = None,
            ) -> None:
                self.name, self.path_of, self.headers = name, path_of, headers
                self.conversations = conversations
                self.latencies: list[float] = []
                self.elapsed_s = 0.0
                self.errors = 0
                self.cpu_s: dict[str, float] = {}

            def report(self) -> tuple[float, float, float]:
                q = statistics.quantiles(self.latencies, n=100)
                rate = len(self.latencies) / self.elapsed_s
                print(
                    f"  {mode:8} {self.name:11} {rate:8,.0f} req/s  p50 {q[49] * 1000:6.2f} ms  "
                    f"p99 {q[98] * 1000:7.2f} ms  errors {self.errors}",
                    flush=True,
                )
                if cpu:
                    per_turn = sorted(
                        (
                            (used / len(self.latencies) * 1000, group)
                            for group, used in self.cpu_s.items()
                            if used > 0
                        ),
                        reverse=True,
                    )
                    total = sum(ms for ms, _ in per_turn)
                    shown = ", ".join(f"{group} {ms:.1f}" for ms, group in per_turn[:8])
                    print(f"  {mode:8} {self.name:11} CPU ms/turn {total:.1f}: {shown}")
                return rate, q[49], q[98]

        async def drive(path: Measured, seconds: float, warm_up: bool) -> None:
            connector = aiohttp.TCPConnector(limit=clients)
            async with aiohttp.ClientSession(base, connector=connector, headers=path.headers) as s:

                async def turn(n: int, i: int) -> int:
                    talk = path.conversations
                    body = BODY if talk is None else {"messages": talk.ask(n, i)}
                    async with s.post(path.path_of(n, i), json=body) as response:
                        reply = await response.read()
                    if talk is not None and response.status == 200:
                        talk.answered(n, i, json.loads(reply)["content"])
                    return response.status

                async def warm(n: int) -> None:
                    await turn(n, 0)

                async def worker(n: int) -> None:
                    done = 1
                    while time.monotonic() < stop_at:
                        started = time.perf_counter()
                        path.errors += await turn(n, done) != 200
                        path.latencies.append(time.perf_counter() - started)
                        done += 1

                # One untimed request per client first: the steady state is measured, not a new
                # replica's first turn, which waits for its model client (hypercore_bench's).
                if warm_up:
                    await asyncio.gather(*(warm(n) for n in range(clients)))
                cpu_before = _cpu_by_group() if cpu else {}
                started = time.monotonic()
                stop_at = started + seconds
                await asyncio.gather(*(worker(n) for n in range(clients)))
                path.elapsed_s += time.monotonic() - started
                for group, used in _cpu_by_group().items() if cpu else ():
                    delta = used - cpu_before.get(group, used)
                    path.cpu_s[group] = path.cpu_s.get(group, 0.0) + delta

        async def measure() -> None:
            echo = Measured("echo", lambda n, i: "/echo", None)
            await drive(echo, seconds, warm_up=True)
            echo.report()
            for gate in gates:
                headers, pools = deploy(gate)

                def path_of(setting: str, pools: dict[str, list[list[str]]] = pools) -> Any:
                    def session_path(n: int, i: int) -> str:
                        pool = pools[setting][n]
                        session = pool[(i // turns) % len(pool)]
                        return f"{PREFIXES[setting]}/v1/sessions/{session}/messages"

                    return session_path

                # Interleaved rounds: the machine's speed drifts (other tenants, the disk), and
                # measuring the baseline once before both gates let that drift decide the ratio.
                talk = Conversations(turns)
                baseline = Measured("baseline", lambda n, i: "/baseline", None, talk)
                fulls = {
                    setting: Measured(
                        f"full/{gate}" + (f"/{setting}" if len(metrics) > 1 else ""),
                        path_of(setting),
                        headers,
                    )
                    for setting in metrics
                }
                order = [baseline, *fulls.values()]
                for r in range(rounds):
                    for path in order[r % len(order) :] + order[: r % len(order)]:
                        await drive(path, seconds / rounds, warm_up=r == 0)
                base_rate, base_p50, base_p99 = baseline.report()
                rates = {}
                for setting, full in fulls.items():
                    rate, p50, p99 = full.report()
                    rates[setting] = rate
                    print(
                        f"  {mode:8} {full.name} over baseline: throughput "
                        f"{rate / base_rate:.0%} (target >= 60%); added latency p50 "
                        f"{(p50 - base_p50) * 1000:.2f} ms (target <= 3 ms), "
                        f"p99 {(p99 - base_p99) * 1000:.2f} ms",
                        flush=True,
                    )
                if "on" in rates and "off" in rates:
                    print(
                        f"  {mode:8} full/{gate} metrics on vs off: {rates['on']:,.1f} vs "
                        f"{rates['off']:,.1f} turns/s, {1 - rates['on'] / rates['off']:+.1%} "
                        "fewer with metrics (target <= 5%)",
                        flush=True,
                    )

        asyncio.run(measure())
        serve.shutdown()
    finally:
        ray.shutdown()
        for process in reversed(processes):
            stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default="default,haproxy")
    parser.add_argument(
        "--turns-per-session", type=int, default=5, help="each client's conversations' length"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="baseline and full alternate, seconds/rounds each"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="also print each path's CPU per turn, by process"
    )
    parser.add_argument(
        "--ttft-ms",
        type=float,
        default=0.0,
        help="the emulated model's time to first token (0: none, the platform's costs alone)",
    )
    parser.add_argument("--gates", default="actor,redis", help="admission gates to measure")
    parser.add_argument(
        "--metrics",
        default="on",
        help="on, off, or on,off: measure the API with the in-Ray metrics and without, "
        "interleaved in the same rounds",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.clients < 1 or args.seconds <= 0:
        parser.error("--rounds and --clients must be at least 1, --seconds above 0")
    if not 0 <= args.ttft_ms <= 60_000:
        parser.error("--ttft-ms must be between 0 and 60000")
    gates = args.gates.split(",")
    metrics = args.metrics.split(",")
    if not set(gates) <= {"actor", "redis"} or not set(metrics) <= set(PREFIXES):
        parser.error("--gates takes actor and/or redis, --metrics on and/or off")
    if args.worker:
        _worker_main(
            args.worker,
            args.clients,
            args.seconds,
            args.turns_per_session,
            args.rounds,
            args.cpu,
            args.ttft_ms,
            os.environ["HF_BENCH_WORK"],
            gates,
            metrics,
        )
        return
    work = Path(tempfile.mkdtemp(prefix="hyperfleet-api-bench-"))
    (work / "token").write_text(secrets.token_hex(32))
    print(f"{os.cpu_count()} CPUs; {args.clients} clients, {args.seconds:g} s per measurement")
    try:
        for mode in args.modes.split(","):
            env = dict(os.environ, HF_BENCH_WORK=str(work), RAY_AUTH_MODE="token")
            env["RAY_AUTH_TOKEN_PATH"] = str(work / "token")
            env.update(LOOPBACK_RAY_ENV)  # Ray on loopback alone
            if mode == "haproxy":
                env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
            argv = [sys.executable, "-m", "benchmarks.api_bench", "--worker", mode]
            argv += ["--clients", str(args.clients), "--seconds", str(args.seconds)]
            argv += ["--turns-per-session", str(args.turns_per_session)]
            argv += ["--rounds", str(args.rounds)] + (["--cpu"] if args.cpu else [])
            argv += ["--ttft-ms", str(args.ttft_ms)]
            argv += ["--gates", args.gates, "--metrics", args.metrics]
            subprocess.run(argv, env=env, check=True, timeout=900)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
