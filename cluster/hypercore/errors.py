"""Errors from Hypercore, typed from the Go error texts it sends, and those texts themselves.

    HypercoreError                  anything Hypercore refused (root; its own root, so that the
    │                               stand-in and the node image need not import ``actors``)
    ├── UnknownWorkload             no workload with that id (Stop, Logs)
    ├── CapacityExceeded            retryable: the host's vCPUs are taken, or no room for more
    ├── InvalidSpawnRequest         the request can never succeed: a bad port, an unknown image
    └── HypercoreUnavailable        retryable: cannot connect, deadline exceeded, no host answered

Hypercore sends every failure as gRPC status UNKNOWN (or HTTP 400) carrying its Go error text, so
a client can only type them by text. The texts below are Hypercore's own (pkg/cluster/serf.go,
pkg/containerd/repo.go, pkg/cluster/service.go); the stand-in sends the same ones.
"""

from __future__ import annotations

# Spawn: SpawnRequest wraps what the chosen host refused in this prefix.
NODE_FAILURE_PREFIX = "node returned failure response: "
# Spawn: no host accepted the dry-run query (a port above 65535 makes a host ignore the query).
NO_RESPONSE = "no response received from nodes"
# Stop: no host stopped the workload (every failure response is ignored).
NO_SUCCESS_RESPONSE = "no success response received from nodes"
# Host refusals inside NODE_FAILURE_PREFIX.
CAPACITY_PREFIX = "cannot spawn container: "
CAPACITY = (
    CAPACITY_PREFIX
    + "have capacity for {cpus} vCPUs, already in use: {used}, requested: {requested}"
)
SPAWN_FAILED_PREFIX = "failed to spawn container: "
PULL_FAILED = SPAWN_FAILED_PREFIX + "failed to pull image {ref}: {reason}"
START_FAILED = SPAWN_FAILED_PREFIX + "failed to start task for container {id}: {reason}"
# Logs over gRPC: the workload is not in the cached state.
LOGS_UNKNOWN = "workload {id} does not exist"
# Logs over HTTP: the host reads the workload's log file.
LOGS_NO_FILE = "open {path}: no such file or directory"
# Not sent by Hypercore: the port check a client runs before sending (Hypercore's own check only
# makes the host ignore the query, which surfaces later as NO_RESPONSE).
INVALID_PORT = "got invalid port {port} greater than 65535"


class HypercoreError(Exception):
    """Hypercore refused or failed a call. ``retryable``: the same call may succeed later."""

    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownWorkload(HypercoreError):
    """No workload with that id: never spawned, already stopped, or not yet in the cached List."""


class CapacityExceeded(HypercoreError):
    """The host cannot take the workload now; it may once other workloads stop."""

    retryable = True


class InvalidSpawnRequest(HypercoreError):
    """The request itself is wrong (a port above 65535, an image no host can pull)."""


class HypercoreUnavailable(HypercoreError):
    """Hypercore could not be reached, did not answer in time, or had no host that answered."""

    retryable = True


def error_from_text(text: str) -> HypercoreError:
    """Types a Hypercore error text (gRPC UNKNOWN details or an HTTP 400 ``error``).

    Args:
        text: the Go error text as Hypercore sent it.

    Returns:
        The most specific error for the text; ``HypercoreError`` when it is not recognised.
    """
    host_text = text.removeprefix(NODE_FAILURE_PREFIX)
    if text == NO_SUCCESS_RESPONSE or (
        text.startswith("workload ") and text.endswith(" does not exist")
    ):
        return UnknownWorkload(text)
    if text.startswith("open ") and text.endswith(": no such file or directory"):
        return UnknownWorkload(text)
    if text == NO_RESPONSE:
        return HypercoreUnavailable(text)
    if host_text.startswith(CAPACITY_PREFIX):
        return CapacityExceeded(text)
    if host_text.startswith(SPAWN_FAILED_PREFIX + "failed to pull image "):
        return InvalidSpawnRequest(text)
    if host_text.startswith("got invalid port ") or text.startswith("json: cannot unmarshal"):
        return InvalidSpawnRequest(text)
    return HypercoreError(text)
