"""The HTTP API's cost over a bare Serve path, and Serve's default proxy against HAProxy mode.

For each proxy mode it starts a fresh Ray head (HAProxy mode: ``RAY_SERVE_ENABLE_HA_PROXY=1`` and
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the cluster's environment), then measures, with N
keep-alive clients for D seconds each:
- ``echo``: a bare deployment answering a constant (the proxy's own ceiling);
- ``baseline``: a bare deployment forwarding to one actor that calls the emulator (streaming,
  like the agent loop), no auth, no session, no commit;
- ``full``: ``POST /v1/sessions/{id}/messages`` through Hyperfleet's ingress (auth, rate limits,
  quota reservation, routing, the replica's session and loop, the fenced commit, usage), once
  with each admission gate: ``actor`` (the control-store actor and the SQLite session-store
  actor, no Redis) and ``redis`` (admission in the ingress, limits and budgets in Redis, turns
  committed to the Redis session store).
The emulator has zero latency, so the numbers are the platform's own costs. Each client holds
conversations of ``--turns-per-session`` turns (then moves to its next session): a session's
history is resent on every turn, so one endless conversation would measure the emulator's cost
of ever longer prompts rather than the platform's.

    python -m benchmarks.api_bench [--clients 8] [--seconds 10] [--modes default,haproxy]
                                   [--turns-per-session 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

KEY = "sk-ant-bench"
SESSIONS_PER_CLIENT = 40
BODY = {"content": "What is the status of the fleet?"}


def _worker_main(mode: str, clients: int, seconds: float, turns: int, work: str) -> None:
    """Runs in a fresh process per proxy mode: Ray reads the HAProxy flags at start."""
    import aiohttp
    import anthropic
    import httpx
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from actors import start_store_actor
    from cluster.processes import free_port, start_emulator, start_ray_head, start_redis, stop
    from serve_app import APP_NAME, build, start_control_actor

    work_dir = Path(work)
    emulator_port, ray_port, http_port, redis_port = (free_port() for _ in range(4))
    processes = [start_emulator(emulator_port, KEY, work_dir / f"emu-{mode}.log")]
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

            async def call(self, text: str) -> dict[str, Any]:
                async with self.client.messages.stream(
                    model="claude-sonnet-5-5",
                    max_tokens=1024,
                    messages=[{"role": "user", "content": text}],
                ) as stream:
                    message = await stream.get_final_message()
                return message.model_dump(mode="json")

        _caller = Caller.options(name="baseline-caller", lifetime="detached").remote()

        @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25})
        class Baseline:
            def __init__(self) -> None:
                self.caller = ray.get_actor("baseline-caller", namespace="hyperfleet")

            async def __call__(self, request: Request) -> JSONResponse:
                body = await request.json()
                return JSONResponse(await self.caller.call.remote(body["content"]))

        @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.25})
        class Echo:
            async def __call__(self, request: Request) -> JSONResponse:
                return JSONResponse({"ok": True})

        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(Baseline.bind(), name="baseline", route_prefix="/baseline")
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        base = f"http://127.0.0.1:{http_port}"

        def deploy(gate: str) -> tuple[dict[str, str], list[list[str]]]:
            """The API with one gate; a user, an agent and each client's pool of sessions."""
            for name in ("control-store",):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace="hyperfleet"), no_restart=True)
            time.sleep(1.0)
            control = start_control_actor(
                work_dir / f"c-{mode}-{gate}.db", redis_url if gate == "redis" else None
            )
            ray.get(control.ping.remote(), timeout=60)
            ray.get(
                control.call.remote("create_user", "usr_b", "bench", {"requests_per_minute": 10**7})
            )
            user_key = ray.get(control.call.remote("issue_key", "usr_b"))["api_key"]
            runtime: dict[str, Any] = {"anthropic_base_url": emulator_url, "anthropic_api_key": KEY}
            config: dict[str, Any] = {"runtime": runtime, "ip_requests_per_minute": 10**7}
            if gate == "redis":
                config = {**config, "redis_url": redis_url}
                runtime["store_url"] = redis_url
            serve.run(build(config, num_replicas=2), name=APP_NAME, route_prefix="/")
            headers = {"Authorization": f"Bearer {user_key}"}
            with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
                agent = http.post("/v1/agents", json={"max_sessions": 1000}).json()
                pools = [
                    [
                        http.post(f"/v1/agents/{agent['id']}/sessions").json()["id"]
                        for _ in range(SESSIONS_PER_CLIENT)
                    ]
                    for _ in range(clients)
                ]
            return headers, pools

        async def drive(
            name: str, path_of: Any, headers: dict[str, str] | None = None
        ) -> tuple[float, float, float]:
            latencies: list[float] = []
            errors = 0
            connector = aiohttp.TCPConnector(limit=clients)
            async with aiohttp.ClientSession(base, connector=connector, headers=headers) as s:

                async def warm(n: int) -> None:
                    async with s.post(path_of(n, 0), json=BODY) as response:
                        await response.read()

                async def worker(n: int) -> None:
                    nonlocal errors
                    done = 1
                    while time.monotonic() < stop_at:
                        started = time.perf_counter()
                        async with s.post(path_of(n, done), json=BODY) as response:
                            await response.read()
                            errors += response.status != 200
                        latencies.append(time.perf_counter() - started)
                        done += 1

                # One untimed request per client first: the steady state is measured, not a new
                # replica's first turn, which waits for its model client (hypercore_bench's).
                await asyncio.gather(*(warm(n) for n in range(clients)))
                started = time.monotonic()
                stop_at = started + seconds
                await asyncio.gather(*(worker(n) for n in range(clients)))
                elapsed = time.monotonic() - started
            q = statistics.quantiles(latencies, n=100)
            rate = len(latencies) / elapsed
            print(
                f"  {mode:8} {name:11} {rate:8,.0f} req/s  p50 {q[49] * 1000:6.2f} ms  "
                f"p99 {q[98] * 1000:7.2f} ms  errors {errors}",
                flush=True,
            )
            return rate, q[49], q[98]

        async def measure() -> None:
            await drive("echo", lambda n, i: "/echo")
            base_rate, base_p50, base_p99 = await drive("baseline", lambda n, i: "/baseline")
            for gate in ("actor", "redis"):
                headers, pools = deploy(gate)

                def path_of(n: int, i: int, pools: list[list[str]] = pools) -> str:
                    pool = pools[n]
                    return f"/v1/sessions/{pool[(i // turns) % len(pool)]}/messages"

                rate, p50, p99 = await drive(f"full/{gate}", path_of, headers)
                print(
                    f"  {mode:8} full/{gate} over baseline: throughput {rate / base_rate:.0%} "
                    f"(target >= 60%); added latency p50 {(p50 - base_p50) * 1000:.2f} ms "
                    f"(target <= 3 ms), p99 {(p99 - base_p99) * 1000:.2f} ms",
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker_main(
            args.worker,
            args.clients,
            args.seconds,
            args.turns_per_session,
            os.environ["HF_BENCH_WORK"],
        )
        return
    work = Path(tempfile.mkdtemp(prefix="hyperfleet-api-bench-"))
    (work / "token").write_text(secrets.token_hex(32))
    print(f"{os.cpu_count()} CPUs; {args.clients} clients, {args.seconds:g} s per measurement")
    try:
        for mode in args.modes.split(","):
            env = dict(os.environ, HF_BENCH_WORK=str(work), RAY_AUTH_MODE="token")
            env["RAY_AUTH_TOKEN_PATH"] = str(work / "token")
            if mode == "haproxy":
                env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
            argv = [sys.executable, "-m", "benchmarks.api_bench", "--worker", mode]
            argv += ["--clients", str(args.clients), "--seconds", str(args.seconds)]
            argv += ["--turns-per-session", str(args.turns_per_session)]
            subprocess.run(argv, env=env, check=True, timeout=900)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
