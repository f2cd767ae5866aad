"""What the node provider measures, and the one HTTP server per process that serves it.

The provider runs inside Ray's autoscaler (the monitor process on the head), which is no Ray
worker: it never calls ``ray.init`` (``ray/autoscaler/v2/monitor.py`` only builds a
``GcsClient``), so ``ray.util.metrics`` has no core worker to export through there. Ray's monitor
serves its own ``prometheus_client`` registry on ``AUTOSCALER_METRIC_PORT`` (44217), but that
registry is the monitor's private attribute. So the provider keeps a ``CollectorRegistry`` of its
own (the process's default registry, and whatever else lands in it, stays out) and serves it with
``prometheus_client`` on ``metrics_port`` of the head's address (``docs/observability.md``).

Per process, not per provider: Ray builds several provider instances in one process, and they
share these metrics and at most one server per address.

Hypercore's calls are measured at the transport (``MeteredTransport``), beneath
``HypercoreClient``, so every call the provider's client makes is counted once, whichever of its
methods made it. Hypercore sends every refusal as gRPC UNKNOWN (or HTTP 400) with a Go error
text, so the code would say nothing: the outcome is the typed error the client made of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cluster.hypercore import (
    CapacityExceeded,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    Transport,
    UnknownWorkload,
)

logger = logging.getLogger(__name__)

# Spawn may take Hypercore's 90 s image pull; List and Logs take milliseconds.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
METHODS = ("Spawn", "Stop", "List", "Logs")
# hyperfleet_vms's states, in the provider's view (List has no state of its own).
VM_RUNNING = "running"  # in Hypercore's List, its node live
VM_SPAWNED = "spawned"  # Spawned by this process, not in List yet
VM_STOPPING = "stopping"  # in List still, but Stopped or its node terminated
VM_STATES = (VM_RUNNING, VM_SPAWNED, VM_STOPPING)

REGISTRY = CollectorRegistry()
HYPERCORE_REQUESTS = Counter(
    "hyperfleet_hypercore_requests",
    "The node provider's calls to Hypercore, by method and outcome.",
    ["method", "outcome"],
    registry=REGISTRY,
)
HYPERCORE_REQUEST_SECONDS = Histogram(
    "hyperfleet_hypercore_request_duration_seconds",
    "One call from the node provider to Hypercore, by method.",
    ["method"],
    buckets=DURATION_BUCKETS_S,
    registry=REGISTRY,
)
VMS = Gauge(
    "hyperfleet_vms",
    "Hypercore workloads of this cluster the node provider knows, by node type and state.",
    ["node_type", "state"],
    registry=REGISTRY,
)
for _method in METHODS:
    HYPERCORE_REQUESTS.labels(_method, "ok")
    HYPERCORE_REQUEST_SECONDS.labels(_method)

_lock = threading.Lock()
_servers: dict[tuple[str, int], Any] = {}  # (host, port) -> its running server
_reported_vms: set[tuple[str, str]] = set()


def outcome_of(error: BaseException) -> str:
    """The ``outcome`` label of a failed call: the kind of error, never its text."""
    if isinstance(error, HypercoreUnavailable):
        cause = error.__cause__
        timed_out = isinstance(cause, TimeoutError) or (
            isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        )
        return "timeout" if timed_out else "unavailable"
    if isinstance(error, UnknownWorkload):
        return "unknown_workload"
    if isinstance(error, CapacityExceeded):
        return "capacity_exceeded"
    if isinstance(error, InvalidSpawnRequest):
        return "invalid_request"
    return "error"


class MeteredTransport:
    """A ``Transport`` that counts and times each call of the one it wraps (same contract)."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner

    def call(self, method: str, request: Any, timeout_s: float) -> Any:
        started = time.perf_counter()
        outcome = "error"
        try:
            response = self._inner.call(method, request, timeout_s)
            outcome = "ok"
            return response
        except BaseException as e:  # counted, then raised as it was
            outcome = outcome_of(e)
            raise
        finally:
            HYPERCORE_REQUEST_SECONDS.labels(method).observe(time.perf_counter() - started)
            HYPERCORE_REQUESTS.labels(method, outcome).inc()

    def close(self) -> None:
        self._inner.close()


def report_vms(counts: Mapping[tuple[str, str], int]) -> None:
    """Sets ``hyperfleet_vms`` to ``counts`` (by node type and state): every state of each node
    type seen is set (0 when none), and node types no longer seen go to 0."""
    with _lock:
        current = {(t, s): 0 for t in {t for t, _ in counts} for s in VM_STATES}
        current.update(counts)
        for key in _reported_vms - current.keys():
            VMS.labels(*key).set(0)
        for key, count in current.items():
            VMS.labels(*key).set(count)
        _reported_vms.update(current)


def metrics_host(head_address: str | None) -> str | None:
    """The host of ``HOST:PORT`` (IPv6 in brackets or not); None without one."""
    if not head_address:
        return None
    host, sep, _ = head_address.rpartition(":")
    return (host.strip("[]") or None) if sep else None


def serve(host: str, port: int) -> bool:
    """Serves ``REGISTRY`` at ``http://host:port/metrics``, once per address per process.

    Returns whether a server runs there now. A port already taken is logged, not raised: the
    autoscaler must scale whether or not its metrics can be served, and a later provider
    instance tries again.
    """
    with _lock:
        if (host, port) in _servers:
            return True
        try:
            server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as e:
            logger.warning("cannot serve the provider's metrics on %s:%d: %s", host, port, e)
            return False
        _servers[(host, port)] = server
    logger.info("serving the provider's metrics on http://%s:%d/metrics", host, port)
    return True
