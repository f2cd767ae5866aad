"""What the node agent measures, served by ``prometheus_client`` on the node's own address.

The agent is the workload's entrypoint, outside Ray (and before Ray, while it joins), so
``ray.util.metrics`` cannot carry these: it has a registry of its own and, unless
``HYPERFLEET_METRICS_PORT`` is 0, its own small HTTP server on ``node_ip:HYPERFLEET_METRICS_PORT``
(``docs/node-agent.md``). Ray's metrics agent on the node serves Ray's metrics, not these.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

logger = logging.getLogger("hyperfleet.node")


class JoinAttempt(StrEnum):
    """The ``outcome`` of one of a worker's join requests."""

    JOINED = "joined"  # the head answered the token
    RETRY = "retry"  # no answer, 409, 429 or 5xx: tried again after a wait
    FAILED = "failed"  # a final refusal, a reply not sealed to this node, or the deadline


class NodeState(StrEnum):
    """What the agent is doing: ``hyperfleet_node_state`` is 1 for the current one."""

    STARTING = "starting"  # reading GPUs, starting the join service
    JOINING = "joining"  # a worker redeeming its ticket
    RUNNING = "running"  # `ray start --block` runs
    PARKED = "parked"  # a worker whose Ray exited, waiting to be terminated
    STOPPING = "stopping"  # asked to stop: Ray drains


class NodeMetrics:
    """One agent's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._joins = Counter(
            "hyperfleet_node_joins",
            "A worker's join requests to the head's join service, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in JoinAttempt:
            self._joins.labels(outcome.value)
        self._state = Gauge(
            "hyperfleet_node_state",
            "1 for what the node agent is doing now, 0 for the other states.",
            ["state"],
            registry=self.registry,
        )
        self.set_state(NodeState.STARTING)

    def count_join(self, outcome: JoinAttempt) -> None:
        self._joins.labels(outcome.value).inc()

    def set_state(self, state: NodeState) -> None:
        for each in NodeState:
            self._state.labels(each.value).set(1 if each is state else 0)

    def serve(self, host: str, port: int) -> Any | None:
        """Serves the registry at ``http://host:port/metrics``; returns the server to
        ``shutdown`` and ``server_close``, or None if ``port`` is 0 or cannot be bound (logged:
        a node runs Ray whether or not its metrics can be served)."""
        if port == 0:
            return None
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            logger.warning("cannot serve the agent's metrics on %s:%d: %s", host, port, e)
            return None
        logger.info("metrics on http://%s:%d/metrics", host, port)
        return server
