"""``GET /ready``'s answer: shared by concurrent probes, at most ``ttl_s`` old, and naming what
is not ready."""

from __future__ import annotations

import asyncio

from hyperfleet.errors import StoreError
from serve_app.readiness import Readiness


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


async def test_one_check_per_ttl_and_what_failed_is_named() -> None:
    clock = Clock()
    calls: list[str] = []
    release = asyncio.Event()
    down = False

    async def control() -> None:
        calls.append("control")
        await release.wait()

    async def sessions() -> None:
        calls.append("sessions")
        if down:
            raise StoreError("the session store is unreachable")

    readiness = Readiness({"control_store": control, "session_store": sessions}, 1.0, clock)
    probes = [asyncio.create_task(readiness.answer()) for _ in range(20)]
    await asyncio.sleep(0)
    probes[0].cancel()  # a probe that goes away does not cancel the others' check
    release.set()
    answers = await asyncio.gather(*probes[1:])
    assert all(a == {"control_store": "ok", "session_store": "ok"} for a in answers)
    assert calls == ["control", "sessions"]

    down = True
    clock.now_s += 0.9
    assert (await readiness.answer())["session_store"] == "ok"  # still the cached answer
    clock.now_s += 0.2
    assert await readiness.answer() == {
        "control_store": "ok",
        "session_store": "the session store is unreachable",
    }
    assert calls == ["control", "sessions"] * 2
