"""Hypercore's error texts (pkg/cluster/serf.go, pkg/containerd/repo.go) map to typed errors."""

from __future__ import annotations

import pytest

from cluster.hypercore import (
    CapacityExceeded,
    HypercoreError,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    UnknownWorkload,
)
from cluster.hypercore.errors import error_from_text

CASES = [
    ("no success response received from nodes", UnknownWorkload),
    ("workload 6f1c0e1a-0000-4000-8000-000000000000 does not exist", UnknownWorkload),
    ("open /tmp/hypercore/abc: no such file or directory", UnknownWorkload),
    ("no response received from nodes", HypercoreUnavailable),
    (
        "node returned failure response: cannot spawn container: have capacity for 2 vCPUs, "
        "already in use: 220, requested: 8",
        CapacityExceeded,
    ),
    (
        "node returned failure response: failed to spawn container: failed to pull image "
        'docker.io/x/y:1: failed to resolve reference "docker.io/x/y:1": not found',
        InvalidSpawnRequest,
    ),
    ("got invalid port 70000 greater than 65535", InvalidSpawnRequest),
    (
        "json: cannot unmarshal string into Go struct field VmSpawnRequest.cores of type uint32",
        InvalidSpawnRequest,
    ),
    (
        "node returned failure response: failed to spawn container: failed to start task for "
        "container abc: permission denied",
        HypercoreError,
    ),
    ("something new", HypercoreError),
]


@pytest.mark.parametrize(("text", "kind"), CASES)
def test_texts_map_to_types(text: str, kind: type[HypercoreError]) -> None:
    error = error_from_text(text)
    assert type(error) is kind
    assert error.message == str(error) == text


def test_only_waiting_can_help_with_retryable_errors() -> None:
    assert CapacityExceeded("x").retryable and HypercoreUnavailable("x").retryable
    assert not UnknownWorkload("x").retryable and not InvalidSpawnRequest("x").retryable
    assert all(issubclass(kind, HypercoreError) for _, kind in CASES)
