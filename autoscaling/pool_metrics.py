"""The pool controller's metrics (``docs/observability.md``'s catalogue), by ``ray.util.metrics``.

The pool gauge is per agent (``agent``, as ``hyperfleet_sessions_active`` is: bounded by the
agents that exist, and a deleted agent's series goes ~20 s after its last tick); the counters are
fleet-wide. The gauge is set on every tick (every ``tick_s``, well within the
twice-the-report-interval that Ray keeps a gauge exported for).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from actors.metrics import SECONDS_BUCKETS, Instruments

StartOutcome = Literal["ready", "failed"]
DRAIN_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class _Pool:
    replicas: Any
    decisions: Any
    starts: Any
    start_seconds: Any
    drain_seconds: Any
    sessions_moved: Any
    capped: Any
    replaced: Any


def _make() -> _Pool:
    from ray.util.metrics import Counter, Gauge, Histogram

    return _Pool(
        replicas=Gauge(
            "hyperfleet_pool_replicas",
            "An agent pool's replicas: desired, and by state (ready, starting, draining)",
            ("agent", "state"),
        ),
        decisions=Counter(
            "hyperfleet_pool_decisions",
            "Scaling decisions, by reason and direction (up, down, hold)",
            ("reason", "direction"),
        ),
        starts=Counter(
            "hyperfleet_pool_replica_starts", "Replicas the controller started", ("outcome",)
        ),
        start_seconds=Histogram(
            "hyperfleet_pool_replica_start_seconds",
            "From asking Ray for a replica to its first health answer (a new VM included)",
            list(SECONDS_BUCKETS),
        ),
        drain_seconds=Histogram(
            "hyperfleet_pool_drain_seconds",
            "From a replica's drain to its stop (its running turns finished)",
            list(DRAIN_BUCKETS),
        ),
        sessions_moved=Counter(
            "hyperfleet_pool_sessions_moved", "Session routes moved off a drained replica"
        ),
        capped=Counter(
            "hyperfleet_pool_capped_replicas",
            "Replicas a decision wanted that the fleet's cap or an owner's quota refused",
        ),
        replaced=Counter(
            "hyperfleet_pool_replicas_replaced",
            "Ready replicas killed and replaced because they stopped answering the controller",
        ),
    )


_POOL = Instruments(_make)


def pool(agent_id: str, counts: Mapping[str, int]) -> None:
    """An agent pool's replicas: ``desired``, ``ready``, ``starting``, ``draining``."""
    m = _POOL.get()
    if m is None:
        return
    for state, value in counts.items():
        m.replicas.set(value, {"agent": agent_id, "state": state})


def decided(reason: str, delta: int) -> None:
    m = _POOL.get()
    if m is not None:
        direction = "up" if delta > 0 else "down" if delta < 0 else "hold"
        m.decisions.inc(1, {"reason": reason, "direction": direction})


def started(outcome: StartOutcome, seconds: float | None = None) -> None:
    m = _POOL.get()
    if m is None:
        return
    m.starts.inc(1, {"outcome": outcome})
    if seconds is not None:
        m.start_seconds.observe(seconds)


def drained(seconds: float, moved: int) -> None:
    m = _POOL.get()
    if m is None:
        return
    m.drain_seconds.observe(seconds)
    if moved > 0:  # Counter.inc(0) raises in Ray 2.60
        m.sessions_moved.inc(moved)


def replaced(moved: int) -> None:
    m = _POOL.get()
    if m is None:
        return
    m.replaced.inc(1)
    if moved > 0:
        m.sessions_moved.inc(moved)


def capped(count: int) -> None:
    m = _POOL.get()
    if m is not None and count > 0:
        m.capped.inc(count)
