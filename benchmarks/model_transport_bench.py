"""The CPU a replica's model client spends reading streams, on each of the SDK's transports.

A replica reads every model call as a stream of SSE events, one a token, and at 50 tokens a
second that reading is most of its CPU per turn. This starts an emulator (500 ms to the first
token, 50 tokens a second), then on each transport (``actors.actor.model_client``: the SDK's
aiohttp transport, and its default httpx) runs ``--calls`` streamed calls ``--concurrency`` at
a time in this process, alternating the transports ``--rounds`` times, and prints the CPU
milliseconds (this process's user + system) per call and per event.

    python -m benchmarks.model_transport_bench [--calls 300] [--concurrency 50] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from actors.actor import model_client
from benchmarks.emulator_bench import KEY, READY_TIMEOUT_S, _free_port, _peak

TRANSPORTS = ("aiohttp", "httpx")
MODEL = "claude-sonnet-5-5"


async def _measure(
    base_url: str, transport: str, calls: int, concurrency: int
) -> tuple[float, int]:
    """CPU seconds spent on ``calls`` streamed calls, and the events they carried."""
    client = model_client(KEY, base_url, transport=transport)  # type: ignore[arg-type]
    gate = asyncio.Semaphore(concurrency)
    events = 0

    async def one(n: int) -> None:
        nonlocal events
        async with gate:
            stream = await client.messages.create(
                model=MODEL,
                max_tokens=256,
                messages=[{"role": "user", "content": f"call {n}: tell me something"}],
                stream=True,
            )
            async for _ in stream:
                events += 1

    try:
        await one(-1)  # the connection pool and the SDK's lazy imports, outside the measure
        events = 0
        before = time.process_time()
        await asyncio.gather(*(one(n) for n in range(calls)))
        return time.process_time() - before, events
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "emulator",
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--ttft-ms",
            "500",
            "--tps",
            "50",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    totals = {t: [0.0, 0, 0] for t in TRANSPORTS}  # CPU s, events, calls
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
        for _ in range(args.rounds):
            for transport in TRANSPORTS:
                cpu_s, events = asyncio.run(_measure(base, transport, args.calls, args.concurrency))
                totals[transport][0] += cpu_s
                totals[transport][1] += events
                totals[transport][2] += args.calls
                print(
                    f"  {transport:8} {args.calls} calls: {1000 * cpu_s / args.calls:.2f} "
                    f"CPU ms a call, {1e6 * cpu_s / max(events, 1):.0f} us an event",
                    flush=True,
                )
    finally:
        os.kill(emulator.pid, signal.SIGTERM)
        emulator.wait(30)
    for transport, (cpu_s, events, calls) in totals.items():
        print(
            f"{transport}: {1000 * cpu_s / calls:.2f} CPU ms a call ({events / calls:.0f} "
            f"events), {1e6 * cpu_s / max(events, 1):.0f} us an event, {calls} calls"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
