"""The tester's own health: how late its event loop runs, and how much CPU it burns.

A load generator that saturates measures itself: its event loop falls behind, every latency
it records grows, and the API is blamed. So each load-generating process samples its own
event-loop lag (how late a short sleep wakes) and its CPU time for the whole run, reports
both, and warns when the lag's p99 passes ``LAG_WARN_MS`` or the CPU ``CPU_WARN_PERCENT`` of a
core: its numbers are then a floor, and the load should be split across processes
(``--workers``) or machines.
"""

from __future__ import annotations

import asyncio
import collections
import time

from .report import percentile

LAG_INTERVAL_S = 0.05
LAG_SAMPLES_MAX = 500_000
LAG_WARN_MS = 50.0
CPU_WARN_PERCENT = 70.0


class ClientMonitor:
    """The tester's own load: event-loop lag sampled every ``LAG_INTERVAL_S``, CPU seconds."""

    def __init__(self) -> None:
        self.lags_ms: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=LAG_SAMPLES_MAX
        )
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()
        self.stopped: tuple[float, float] | None = None  # (CPU, wall) when the load ended

    def stop(self) -> None:
        self.stopped = (time.process_time(), time.perf_counter())

    async def sample(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(LAG_INTERVAL_S)
            now = time.perf_counter()
            self.lags_ms.append((now, max(0.0, (now - before - LAG_INTERVAL_S) * 1000.0)))

    def cpu_s(self) -> float:
        cpu = self.stopped[0] if self.stopped else time.process_time()
        return cpu - self.cpu0

    def cpu_percent(self) -> float:
        wall = (self.stopped[1] if self.stopped else time.perf_counter()) - self.wall0
        return 100.0 * self.cpu_s() / wall if wall > 0 else 0.0

    def lag_p99_ms(self, since: float = 0.0) -> float:
        recent = []
        for t, lag in reversed(self.lags_ms):
            if t < since:
                break
            recent.append(lag)
        return percentile(recent, 99) or 0.0

    def warnings(self, since: float = 0.0) -> list[str]:
        """What says the tester is near saturation, in the samples since ``since``."""
        found = []
        lag = self.lag_p99_ms(since)
        if lag > LAG_WARN_MS:
            found.append(
                f"the tester's event loop lagged {lag:.0f} ms (p99, over {LAG_WARN_MS:g} ms): "
                "its latencies include its own delay; split the load across processes "
                "(--workers N)"
            )
        cpu = self.cpu_percent()
        if cpu > CPU_WARN_PERCENT:
            found.append(
                f"the tester used {cpu:.0f} % of a core (over {CPU_WARN_PERCENT:g} %): it is "
                "near saturation; split the load across processes (--workers N)"
            )
        return found
