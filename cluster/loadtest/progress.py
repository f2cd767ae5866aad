"""The live progress line on stderr: every second on a terminal, every 10 s in a log.

It reads each generator's ``Counters``: in this process with ``--workers 1``, from the Ray
actors with more (the driver polls them; a generator that has not answered keeps its last
counts, so a slow one never holds the line up). Each generator's saturation warnings are
printed the first time it shows them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from .generator import RECENT_S, Counters
from .report import percentile

PROGRESS_INTERVAL_S = 1.0
# Without a terminal (a CI log), a progress line every this many seconds, not every second.
PROGRESS_LOG_INTERVAL_S = 10.0

Poll = Callable[[], Awaitable[Sequence[Counters | None]]]


class Progress:
    """The run's latest counts from each generator, and the latencies of the last
    ``RECENT_S`` seconds, as one line."""

    def __init__(self, generators: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.latest: list[Counters | None] = [None] * generators
        self.clock = clock
        self.recent: collections.deque[tuple[float, float]] = collections.deque()
        self.warned: set[int] = set()

    def update(self, snapshots: Sequence[Counters | None]) -> list[str]:
        """Take the generators' new counts (None: no answer this time); the warnings to
        print now, each generator's once, prefixed with its index when there are several."""
        now = self.clock()
        several = len(self.latest) > 1
        found: list[str] = []
        for index, counters in enumerate(snapshots):
            if counters is None:
                continue
            self.latest[index] = counters
            self.recent.extend((now, latency) for latency in counters.latencies_s)
            if counters.warnings and index not in self.warned:
                self.warned.add(index)
                prefix = f"worker {index}: " if several else ""
                found.extend(prefix + w for w in counters.warnings)
        while self.recent and self.recent[0][0] < now - RECENT_S:
            self.recent.popleft()
        return found

    def line(self) -> str:
        seen = [c for c in self.latest if c is not None]
        elapsed = max((c.elapsed_s for c in seen), default=0.0)
        window = min(RECENT_S, elapsed) or 1.0
        p95 = percentile([latency for _, latency in self.recent], 95)
        p95_text = "-" if p95 is None else f"{p95:.3f} s"
        counts = [
            sum(getattr(c, name) for c in seen)
            for name in ("sessions_open", "in_flight", "completed", "failed", "retries")
        ]
        cpu = max((c.cpu_percent for c in seen), default=0.0)
        lag = max((c.lag_p99_ms for c in seen), default=0.0)
        workers, busiest = "", ""
        if len(self.latest) > 1:
            started = sum(1 for c in seen if c.started)
            workers, busiest = f"workers {started}/{len(self.latest)} | ", "max "
        return (
            f"[{elapsed:6.1f} s] {workers}sessions {counts[0]}, in flight {counts[1]} | "
            f"ok {counts[2]}, failed {counts[3]}, retries {counts[4]} | "
            f"{len(self.recent) / window:.1f} req/s, p95 {p95_text} | "
            f"tester cpu {busiest}{cpu:.0f} %, lag p99 {busiest}{lag:.1f} ms"
        )


async def show_progress(progress: Progress, poll: Poll, out: TextIO) -> None:
    """Poll the generators and write the line until cancelled."""
    tty = out.isatty()
    interval = PROGRESS_INTERVAL_S if tty else PROGRESS_LOG_INTERVAL_S
    while True:
        await asyncio.sleep(interval)
        found = progress.update(await poll())
        line = progress.line()
        out.write(f"\r{line}\x1b[K" if tty else line + "\n")
        if found:
            out.write(("\n" if tty else "") + "".join(f"warning: {w}\n" for w in found))
        out.flush()
