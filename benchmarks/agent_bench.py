"""Agent runtime numbers on this machine, against real servers on loopback.

1. memory per idle in-memory session with a short transcript (SessionHost, tracemalloc);
2. commit latency per store: SQLite in-process, SQLite behind the head-pinned store actor, Redis;
3. non-streaming turns/s through one replica (a real Ray actor) with a zero-latency emulator;
4. N concurrent streaming sessions on one replica under a latency model, counting errors.

    python -m benchmarks.agent_bench [--sessions 1000] [--commits 500] [--clients 16]
                                     [--seconds 10] [--streams 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import shutil
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TOKEN_DIR = Path(tempfile.mkdtemp(prefix="hyperfleet-bench-"))
(TOKEN_DIR / "token").write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(TOKEN_DIR / "token")

from cluster.cli.servers import LOOPBACK_RAY_ENV  # noqa: E402

os.environ.update(LOOPBACK_RAY_ENV)  # Ray on loopback alone
import anthropic  # noqa: E402
import ray  # noqa: E402

from actors import (  # noqa: E402
    AgentLoop,
    AgentSpec,
    CircuitBreaker,
    LoopConfig,
    RedisSessionStore,
    Resources,
    RuntimeConfig,
    SessionHost,
    SessionStore,
    SqliteSessionStore,
    spawn_replica,
    start_store_actor,
)
from actors.store.actor import ActorSessionStore  # noqa: E402
from actors.store.base import SessionRecord, TurnRecord  # noqa: E402
from actors.tools import Sandbox, build_tools  # noqa: E402
from cluster.cli.servers import start_emulator, start_ray_head, start_redis  # noqa: E402
from hyperfleet.processes import free_port, stop  # noqa: E402

KEY = "sk-ant-bench"


def _quantiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100)
    return f"p50 {q[49] * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms"


async def memory_per_session(base_url: str, count: int, work: Path) -> None:
    spec = AgentSpec(max_sessions=count + 1)
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key=KEY)
    loop = AgentLoop(
        client,
        LoopConfig(spec.model, spec.system, spec.max_tokens, spec.max_turns),
        build_tools((), Sandbox(), 5),
        CircuitBreaker(),
    )
    store = SqliteSessionStore(work / "memory.db")
    host = SessionHost("mem", spec, store, loop, work / "ws")
    ids = [(await host.open_session("bench"))["id"] for _ in range(count)]
    for sid in ids:
        await host.send(sid, "Hello, please remember this short note about the quarterly report.")
    host._clock = lambda: 1e12  # every session is idle past its TTL: evict them all
    host.evict_idle()
    host._clock = time.monotonic
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for sid in ids:
        await host._get(sid, None)  # reload from the store into memory
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per = (after - before) / count
    messages = sum(len(s.messages) for s in host._sessions.values()) / count
    print(
        f"memory per idle session ({count} sessions, {messages:.0f} messages each): "
        f"{per / 1024:.1f} KB (target <= 50 KB)"
    )
    await client.close()
    store.close()


def _turn(session_id: str, index: int) -> TurnRecord:
    return TurnRecord(
        session_id=session_id,
        index=index,
        turn_id=uuid.uuid4().hex,
        request_digest="d",
        messages=[
            {"role": "user", "content": "a short user message"},
            {"role": "assistant", "content": [{"type": "text", "text": "a short reply " * 20}]},
        ],
        stop_reason="end_turn",
        usage={"input_tokens": 20, "output_tokens": 60},
        cost_usd=0.001,
        model="claude-sonnet-5-5",
        created_at=time.time(),
        last_seq=index,
    )


async def commit_latency(name: str, store: SessionStore, count: int) -> None:
    record = SessionRecord("ses_" + uuid.uuid4().hex, "bench", "bench", time.time())
    await store.create_session(record)
    latencies = []
    for i in range(1, count + 1):
        started = time.perf_counter()
        await store.commit_turn(_turn(record.session_id, i), expected_version=i - 1)
        latencies.append(time.perf_counter() - started)
    mean = statistics.mean(latencies)
    print(f"commit latency, {name}: {_quantiles(latencies)}, {1 / mean:,.0f} commits/s serial")


async def _drive(clients: int, seconds: float, call: Callable[[int], Awaitable[Any]]) -> None:
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def worker(n: int) -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await call(n)
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(clients)))
    elapsed = time.monotonic() - started
    print(
        f"turns through one replica, {clients} clients, zero-latency emulator: "
        f"{len(latencies) / elapsed:,.0f} turns/s, {_quantiles(latencies)}"
    )


async def turns_per_second(handle: Any, clients: int, seconds: float) -> None:
    sessions = [(await handle.open_session.remote("bench"))["id"] for _ in range(clients)]

    async def call(n: int) -> None:
        await handle.send.remote(sessions[n], "What is the status?")

    await _drive(clients, seconds, call)


async def concurrent_streams(handle: Any, count: int, model: str) -> None:
    sessions = [(await handle.open_session.remote("bench"))["id"] for _ in range(count)]
    errors = 0
    events = 0
    durations: list[float] = []

    async def one(sid: str) -> None:
        nonlocal errors, events
        started = time.monotonic()
        last = None
        async for ref in handle.stream.remote(sid, "Tell me a story"):
            last = await ref
            events += 1
        if last is None or last["type"] != "turn_end":
            errors += 1
        else:
            durations.append(time.monotonic() - started)

    started = time.monotonic()
    await asyncio.gather(*(one(s) for s in sessions))
    elapsed = time.monotonic() - started
    print(
        f"{count} concurrent streaming sessions on one replica ({model}): "
        f"{count - errors} ok, {errors} errors, {events / count:.1f} events per turn, "
        f"turn p50 {statistics.median(durations):.2f} s, wall {elapsed:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=100)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hyperfleet-bench-work-"))
    work.chmod(0o711)
    processes = []
    try:
        fast_port, slow_port, redis_port, ray_port = (free_port() for _ in range(4))
        processes.append(start_emulator(fast_port, KEY, work / "fast.log"))
        latency = ["--ttft-ms", "300", "--tps", "100", "--output-words-min", "100"]
        latency += ["--output-words-max", "100"]
        processes.append(start_emulator(slow_port, KEY, work / "slow.log", *latency))
        processes.append(start_redis(redis_port, work))
        processes.append(start_ray_head(ray_port, work / "ray.log", num_cpus=4))
        ray.init(address=f"127.0.0.1:{ray_port}", namespace="hyperfleet", log_to_driver=False)
        print(f"{os.cpu_count()} CPUs; Ray {ray.__version__}")

        asyncio.run(memory_per_session(f"http://127.0.0.1:{fast_port}", args.sessions, work))

        store_actor = start_store_actor(work / "store.db")
        ray.get(store_actor.ping.remote(), timeout=60)

        async def stores() -> None:
            sqlite = SqliteSessionStore(work / "direct.db")
            await commit_latency("SQLite in-process (WAL, synchronous=FULL)", sqlite, args.commits)
            await commit_latency(
                "SQLite via the store actor", ActorSessionStore(store_actor), args.commits
            )
            redis_store = RedisSessionStore(f"redis://127.0.0.1:{redis_port}/0")
            await commit_latency("Redis (appendfsync always)", redis_store, args.commits)
            await redis_store.aclose()

        asyncio.run(stores())

        spec = AgentSpec(resources=Resources(cores=1, memory_mb=512), max_sessions=1000)

        def replica(name: str, port: int) -> Any:
            runtime = RuntimeConfig(
                anthropic_base_url=f"http://127.0.0.1:{port}",
                anthropic_api_key=KEY,  # type: ignore[arg-type]
                workspaces=str(work / "ws"),
            )
            return spawn_replica(name, 0, spec, runtime)

        fast, slow = replica("bench-fast", fast_port), replica("bench-slow", slow_port)
        ray.get([fast.health.remote(), slow.health.remote()], timeout=60)
        asyncio.run(turns_per_second(fast, args.clients, args.seconds))
        asyncio.run(concurrent_streams(slow, args.streams, "ttft 300 ms, 100 tokens/s, 100 tokens"))
        ray.kill(fast, no_restart=True)
        ray.kill(slow, no_restart=True)
        ray.kill(store_actor, no_restart=True)
    finally:
        ray.shutdown()
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(TOKEN_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
