"""The agent replicas' metrics (``docs/observability.md``'s catalogue), by ``ray.util.metrics``.

The code that does the work calls the small functions here (``turn_finished(model, outcome,
seconds)``); the metric objects, their tag keys and buckets, and the bounding of every label
value live in this one module. ``serve_app/metrics.py`` is the ingress's counterpart and uses
``Instruments`` and ``SECONDS_BUCKETS`` from here.

What Ray 2.60 does with them (checked against the installed wheel, ``ray/util/metrics.py`` and
``ray/_private/telemetry/open_telemetry_metric_recorder.py``):

- Each node's metrics agent serves them as ``ray_<name>``, and a counter gets ``_total``: the
  counter ``hyperfleet_turns`` is ``ray_hyperfleet_turns_total``. Every series also carries the
  recording process's ``WorkerId`` (and ``Component``, ``NodeAddress``, ``SessionName``,
  ``Version``), so each replica's gauges are series of their own: sum them by ``agent``.
- A gauge value that is not set again within two report intervals (``metrics_report_interval_ms``,
  10 s by default) is dropped, even from a live process. So a replica sets its gauges every
  ``gauge_refresh_s()``, and the gauges of a replica that stopped disappear within about 20 s,
  rather than staying at their last value. Counters and histograms of a dead process stay until
  the node's metrics agent restarts (Prometheus's ``rate`` takes that as a reset).
- A histogram's ``_sum`` is rebuilt from bucket midpoints (twice the top bound past it), so a
  mean from ``_sum / _count`` is approximate; the buckets are exact.
- ``Counter.inc`` refuses 0 and negatives (``ValueError``): zero values are skipped here.

Outside a Ray worker (plain-Python tests of the host and the loop) and with
``HYPERFLEET_METRICS=0`` in the process's environment (read once; used only to measure what the
metrics cost, ``benchmarks/api_bench.py --metrics on,off``), every function here does nothing.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from .pricing import PRICES, Usage

METRICS_ENV = "HYPERFLEET_METRICS"
# Log-spaced from 5 ms (a Ray hop) to 10 minutes (a long turn); the same on every node, since a
# node's metrics agent drops a process's histogram whose bounds differ from the first one's.
SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0,
)  # fmt: skip
GAUGE_REFRESH_MAX_S = 5.0
GAUGE_REFRESH_MIN_S = 0.5
OTHER = "other"

TurnOutcome = Literal[
    "committed", "interrupted", "replayed", "failed", "timeout", "budget", "cancelled"
]  # fmt: skip
ModelCallOutcome = Literal[
    "ok", "rate_limit", "overloaded", "api_error", "connection", "stream_broken", "refused",
    "circuit_open", "cancelled",
]  # fmt: skip
ToolOutcome = Literal["ok", "error", "timeout"]
StoreError = Literal["stale", "conflict", "unavailable"]
ReplicaState = Literal["loading", "ready", "failed", "draining"]
REPLICA_STATES: tuple[ReplicaState, ...] = ("loading", "ready", "failed", "draining")
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
TOKEN_KINDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_read", "cache_read_input_tokens"),
    ("cache_write", "cache_creation_input_tokens"),
)

T = TypeVar("T")


@functools.cache
def enabled() -> bool:
    """False when ``HYPERFLEET_METRICS`` is ``0`` (or ``off``, ``false``) in this process."""
    return os.environ.get(METRICS_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


class Instruments(Generic[T]):
    """A role's metric objects, made by ``make`` once per process on first use, and only in a
    process connected to Ray with metrics on (``get`` is None otherwise: record nothing)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: T | None = None

    def get(self) -> T | None:
        if self._made is None:
            ray = sys.modules.get("ray")  # never imported for this: a process without it records
            if ray is None or not enabled() or not ray.is_initialized():
                return None
            self._made = self._make()
        return self._made


def gauge_refresh_s() -> float:
    """How often a replica sets its gauges: within half of Ray's report interval, which they
    must be set within to stay exported."""
    try:
        import ray

        interval_s = float(ray._config.metrics_report_interval_ms()) / 1000
    except (ImportError, AttributeError):
        interval_s = 10.0
    return max(GAUGE_REFRESH_MIN_S, min(GAUGE_REFRESH_MAX_S, interval_s / 2))


# Labels ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def model_label(model: str) -> str:
    """The model's price-table name (a dated id is its family's), or ``other``: a spec's model
    is any string a tenant wrote, so it is never a label as such."""
    if model in PRICES:
        return model
    for name in PRICES:
        if model.startswith(name + "-"):
            return name
    return OTHER


def tool_label(name: str, tools: Mapping[str, Any]) -> str:
    """The tool's name when the agent has it, else ``unknown`` (the model names tools freely)."""
    return name if name in tools else "unknown"


def store_label(store: object) -> str:
    """``actor``, ``sqlite`` or ``redis``: which backend a replica's session store is."""
    return {
        "ActorSessionStore": "actor",
        "SqliteSessionStore": "sqlite",
        "RedisSessionStore": "redis",
    }.get(type(store).__name__, OTHER)


def circuit_value(state: str) -> int:
    """0 closed, 1 half-open, 2 open."""
    return CIRCUIT_STATES.get(state, 0)


def replica_state(client_state: str, draining: bool) -> ReplicaState:
    """A replica's state from its model client's (``loading``, ``ready``, ``failed``)."""
    if draining:
        return "draining"
    return client_state if client_state in ("loading", "failed") else "ready"  # type: ignore[return-value]


# The metric objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Replica:
    turns: Any
    turn_seconds: Any
    first_event_seconds: Any
    model_calls: Any
    model_call_seconds: Any
    tokens: Any
    cost: Any
    sessions_active: Any
    session_capacity: Any
    turns_running: Any
    replicas: Any
    store_commit_seconds: Any
    store_errors: Any
    tool_calls: Any
    tool_seconds: Any
    circuit_state: Any
    circuit_opens: Any
    outbox_swept: Any


def _make() -> _Replica:
    from ray.util.metrics import Counter, Gauge, Histogram

    seconds = list(SECONDS_BUCKETS)
    return _Replica(
        turns=Counter("hyperfleet_turns", "Turns a replica finished", ("model", "outcome")),
        turn_seconds=Histogram(
            "hyperfleet_turn_duration_seconds",
            "A committed turn's wall time in its replica, first model call to commit",
            seconds,
            ("model",),
        ),
        first_event_seconds=Histogram(
            "hyperfleet_turn_first_event_seconds",
            "From a turn's start to its first text or tool event",
            seconds,
            ("model",),
        ),
        model_calls=Counter(
            "hyperfleet_model_calls", "Model API calls (stream attempts)", ("model", "outcome")
        ),
        model_call_seconds=Histogram(
            "hyperfleet_model_call_duration_seconds",
            "One model call, request to its last stream event",
            seconds,
            ("model",),
        ),
        tokens=Counter("hyperfleet_tokens", "Tokens metered", ("model", "kind")),
        cost=Counter("hyperfleet_cost_usd", "List-price cost of the metered tokens", ("model",)),
        sessions_active=Gauge(
            "hyperfleet_sessions_active", "Sessions held in memory by a replica", ("agent",)
        ),
        session_capacity=Gauge(
            "hyperfleet_session_capacity", "Sessions a replica can hold (0 draining)", ("agent",)
        ),
        turns_running=Gauge("hyperfleet_turns_running", "Turns running in a replica", ("agent",)),
        replicas=Gauge("hyperfleet_replicas", "1 for a replica's state, 0 for others", ("state",)),
        store_commit_seconds=Histogram(
            "hyperfleet_store_commit_seconds",
            "A turn's commit in the session store",
            seconds,
            ("store",),
        ),
        store_errors=Counter(
            "hyperfleet_store_errors", "Session-store failures", ("store", "error")
        ),
        tool_calls=Counter("hyperfleet_tool_calls", "Tool runs", ("tool", "outcome")),
        tool_seconds=Histogram(
            "hyperfleet_tool_duration_seconds", "One tool run", seconds, ("tool",)
        ),
        circuit_state=Gauge(
            "hyperfleet_circuit_state", "A replica's model API breaker: 0 closed, 1 half, 2 open"
        ),
        circuit_opens=Counter("hyperfleet_circuit_opens", "Times a breaker opened"),
        outbox_swept=Counter(
            "hyperfleet_usage_outbox_swept", "Usage records a sweep found left in the outbox"
        ),
    )


_REPLICA = Instruments(_make)


# What the code calls -------------------------------------------------------------------------


def turn_finished(model: str, outcome: TurnOutcome, seconds: float | None = None) -> None:
    """A turn ended with ``outcome``; ``seconds``, a committed one's wall time."""
    m = _REPLICA.get()
    if m is None:
        return
    label = model_label(model)
    m.turns.inc(1, {"model": label, "outcome": outcome})
    if seconds is not None:
        m.turn_seconds.observe(seconds, {"model": label})


def turn_first_event(model: str, seconds: float) -> None:
    m = _REPLICA.get()
    if m is not None:
        m.first_event_seconds.observe(seconds, {"model": model_label(model)})


def model_called(model: str, outcome: ModelCallOutcome, seconds: float) -> None:
    m = _REPLICA.get()
    if m is None:
        return
    label = model_label(model)
    m.model_calls.inc(1, {"model": label, "outcome": outcome})
    if outcome not in ("circuit_open", "cancelled"):  # no call was made, or it did not end
        m.model_call_seconds.observe(seconds, {"model": label})


def tokens_used(model: str, usage: Usage) -> None:
    """One model call's tokens and their list-price cost."""
    m = _REPLICA.get()
    if m is None:
        return
    label = model_label(model)
    for kind, field in TOKEN_KINDS:
        count = getattr(usage, field)
        if count > 0:
            m.tokens.inc(count, {"model": label, "kind": kind})
    cost = usage.cost_usd(model)
    if cost > 0:
        m.cost.inc(cost, {"model": label})


def store_committed(store: str, seconds: float) -> None:
    m = _REPLICA.get()
    if m is not None:
        m.store_commit_seconds.observe(seconds, {"store": store})


def store_failed(store: str, error: StoreError) -> None:
    m = _REPLICA.get()
    if m is not None:
        m.store_errors.inc(1, {"store": store, "error": error})


def tool_ran(tool: str, outcome: ToolOutcome, seconds: float) -> None:
    """``tool`` is already bounded (``tool_label``)."""
    m = _REPLICA.get()
    if m is None:
        return
    m.tool_calls.inc(1, {"tool": tool, "outcome": outcome})
    m.tool_seconds.observe(seconds, {"tool": tool})


def circuit_opened() -> None:
    m = _REPLICA.get()
    if m is not None:
        m.circuit_opens.inc(1)


def outbox_swept(records: int) -> None:
    m = _REPLICA.get()
    if m is not None and records > 0:
        m.outbox_swept.inc(records)


@dataclass(frozen=True)
class ReplicaGauges:
    """What a replica reports every ``gauge_refresh_s()``."""

    agent_id: str
    sessions: int
    capacity: int
    turns_running: int
    state: ReplicaState
    circuit: int


def replica_gauges(stats: Mapping[str, Any], client_state: str) -> ReplicaGauges:
    """A replica's gauges from ``SessionHost.stats()`` and its model client's state."""
    draining = bool(stats["draining"])
    return ReplicaGauges(
        agent_id=str(stats["agent_id"]),
        sessions=int(stats["sessions"]),
        capacity=0 if draining else int(stats["capacity"]),
        turns_running=int(stats["busy_sessions"]),
        state=replica_state(client_state, draining),
        circuit=circuit_value(str(stats["breaker"])),
    )


def report_replica(gauges: ReplicaGauges) -> None:
    """Sets the replica's gauges; every state is set (1 for its own, 0 for the others), so a
    change of state shows at once rather than after the old state's value expires."""
    m = _REPLICA.get()
    if m is None:
        return
    agent = {"agent": gauges.agent_id}
    m.sessions_active.set(gauges.sessions, agent)
    m.session_capacity.set(gauges.capacity, agent)
    m.turns_running.set(gauges.turns_running, agent)
    for state in REPLICA_STATES:
        m.replicas.set(1 if state == gauges.state else 0, {"state": state})
    m.circuit_state.set(gauges.circuit)
