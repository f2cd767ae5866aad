"""Throughput and stream capacity of the Anthropic emulator, in one process on this machine.

Starts the emulator (``hyperfleet emulator``) on a free port, then measures from a separate process:
1. non-streaming requests/s at zero latency with N keep-alive clients, with p50/p99 latency;
2. concurrent streaming capacity: C streams opened at once under a latency model (TTFT, tokens/s,
   output length), all expected to finish with ``message_stop`` and no error.

    python -m benchmarks.emulator_bench [--clients 32] [--seconds 10] [--streams 500,1000,2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import aiohttp

BODY = {"model": "claude-sonnet-5-5", "max_tokens": 1024, "messages": []}
KEY = "sk-ant-bench"
READY_TIMEOUT_S = 30
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _headers(extra: dict[str, str]) -> dict[str, str]:
    return {"x-api-key": KEY, "anthropic-version": "2023-06-01", **extra}


async def _rps(url: str, clients: int, seconds: float) -> None:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    headers = _headers({"x-emulator-ttft-ms": "0", "x-emulator-tps": "0"})
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def worker(n: int) -> None:
            nonlocal errors
            i = 0
            while time.monotonic() < stop_at:
                body = dict(BODY, messages=[{"role": "user", "content": f"client {n} asks {i}"}])
                started = time.perf_counter()
                async with http.post(url, json=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(clients)))
        elapsed = time.monotonic() - started
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"non-streaming, zero latency, {clients} clients, {elapsed:.1f} s: "
        f"{len(latencies) / elapsed:,.0f} requests/s, p50 {quantiles[49] * 1000:.1f} ms, "
        f"p99 {quantiles[98] * 1000:.1f} ms, errors {errors}"
    )


async def _streams(url: str, count: int, ttft_ms: float, tps: float, tokens: int) -> None:
    headers = _headers(
        {
            "x-emulator-ttft-ms": str(ttft_ms),
            "x-emulator-tps": str(tps),
            "x-emulator-output-tokens": str(tokens),
        }
    )
    connector = aiohttp.TCPConnector(limit=count + 16)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    ok = errors = 0
    durations: list[float] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(n: int) -> None:
            nonlocal ok, errors
            body = dict(BODY, stream=True, messages=[{"role": "user", "content": f"stream {n}"}])
            started = time.monotonic()
            try:
                async with http.post(url, json=body, headers=headers) as response:
                    done = False
                    async for line in response.content:
                        if line.startswith(b"event: message_stop"):
                            done = True
                        elif line.startswith(b"event: error"):
                            break
                    if response.status == 200 and done:
                        ok += 1
                        durations.append(time.monotonic() - started)
                    else:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

        started = time.monotonic()
        await asyncio.gather(*(one(n) for n in range(count)))
        elapsed = time.monotonic() - started
    ideal = ttft_ms / 1000 + (tokens - 1) / tps if tps else ttft_ms / 1000
    p50 = statistics.median(durations) if durations else float("nan")
    print(
        f"{count} concurrent streams (ttft {ttft_ms:g} ms, {tps:g} tokens/s, {tokens} tokens): "
        f"{ok} ok, {errors} errors, wall {elapsed:.1f} s, stream p50 {p50:.2f} s "
        f"(ideal {ideal:.2f} s)"
    )


def _peak(base: str) -> int:
    with urllib.request.urlopen(base + "/_emulator/stats", timeout=5) as r:  # noqa: S310
        peak: int = json.loads(r.read())["peak_streams"]
        return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", default="500,1000,2000", help="concurrency levels to try")
    parser.add_argument("--ttft-ms", type=float, default=500.0)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--output-tokens", type=int, default=100)
    args = parser.parse_args()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "emulator", "--port", str(port), "--api-key", KEY],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                _peak(base)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("emulator did not start") from None
                time.sleep(0.2)
        print(f"emulator pid {emulator.pid} on {base}; {os.cpu_count()} CPUs on this machine")
        url = base + "/v1/messages"
        asyncio.run(_rps(url, args.clients, args.seconds))
        for count in (int(c) for c in args.streams.split(",")):
            asyncio.run(_streams(url, count, args.ttft_ms, args.tps, args.output_tokens))
            print(f"  emulator peak open streams so far: {_peak(base)}")
    finally:
        os.kill(emulator.pid, signal.SIGTERM)
        emulator.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
