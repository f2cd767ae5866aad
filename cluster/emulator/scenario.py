"""How one request behaves apart from its content: its latency and the fault it suffers.

Both come from the emulator's flags, overridden per request by headers, so tests and benchmarks
choose the scenario of each call:

- ``x-emulator-ttft-ms``, ``x-emulator-tps``: the latency model.
- ``x-emulator-output-tokens``: the length of a plain-text reply.
- ``x-emulator-fault: 429 | 529 | 500 | midstream | drop``: force that fault on this request;
  ``none`` forces no fault. ``x-emulator-fault-after: N``: a stream fault strikes after N events.
- ``x-emulator-retry-after-ms``: the wait advertised with a 429 or 529.

Jitter is drawn from the request's own seed, so the same request gets the same timing; faults
drawn by fraction come from one generator seeded by ``--seed``, in arrival order.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Literal

from .config import EmulatorConfig
from .wire import RequestError, invalid

Fault = Literal["429", "529", "500", "midstream", "drop"]
FAULTS: tuple[Fault, ...] = ("429", "529", "500", "midstream", "drop")


@dataclass(frozen=True)
class Scenario:
    ttft_s: float
    tps: float  # 0: unlimited
    output_tokens: int | None
    fault: Fault | None
    fault_after_events: int
    retry_after_ms: int

    def token_due_s(self, tokens_before: int) -> float:
        """Seconds after the start at which the token after ``tokens_before`` is due."""
        return self.ttft_s + (tokens_before / self.tps if self.tps > 0 else 0.0)


def _number(headers: dict[str, str], name: str, low: float, high: float) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise invalid(f"{name}: header must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise invalid(f"{name}: header must be between {low:g} and {high:g}, got {raw!r}")
    return value


class ScenarioPicker:
    """Draws each request's scenario. Thread-safe; the fault sequence is seeded."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()

    def pick(self, headers: dict[str, str], seed: int, streaming: bool) -> Scenario:
        """The scenario for one request; raises ``RequestError`` for a malformed header."""
        c = self._config
        ttft_ms = _number(headers, "x-emulator-ttft-ms", 0, 600_000)
        tps = _number(headers, "x-emulator-tps", 0, 1_000_000)
        out = _number(headers, "x-emulator-output-tokens", 1, 100_000)
        after = _number(headers, "x-emulator-fault-after", 1, 100_000)
        retry_ms = _number(headers, "x-emulator-retry-after-ms", 0, 600_000)
        ttft_s = (c.ttft_ms if ttft_ms is None else ttft_ms) / 1000
        tps_value = c.tps if tps is None else tps
        if c.jitter:
            jitter = random.Random(seed ^ 0x5EED)
            ttft_s *= 1 + c.jitter * jitter.uniform(-1, 1)
            tps_value *= 1 + c.jitter * jitter.uniform(-1, 1)
        return Scenario(
            ttft_s=ttft_s,
            tps=tps_value,
            output_tokens=None if out is None else int(out),
            fault=self._fault(headers, streaming),
            fault_after_events=c.fault_after_events if after is None else int(after),
            retry_after_ms=c.retry_after_ms if retry_ms is None else int(retry_ms),
        )

    def _fault(self, headers: dict[str, str], streaming: bool) -> Fault | None:
        forced = headers.get("x-emulator-fault")
        if forced is not None:
            if forced == "none":
                return None
            if forced not in FAULTS:
                raise RequestError(
                    400,
                    "invalid_request_error",
                    f"x-emulator-fault: must be one of {', '.join(FAULTS)} or none, got {forced!r}",
                )
            return forced
        c = self._config
        with self._lock:
            draw = self._rng.random()
        edge = 0.0
        for fault, fraction in zip(
            FAULTS,
            (c.fault_429, c.fault_529, c.fault_500, c.fault_midstream, c.fault_drop),
            strict=True,
        ):
            edge += fraction
            if draw < edge:
                if fault in ("midstream", "drop") and not streaming:
                    return None
                return fault
        return None
