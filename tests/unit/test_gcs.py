"""The GCS node-table reader's failures, against real sockets: an answer it cannot get is
``GcsUnavailable`` (the join service's 503, the node agent's "cannot tell"), never a guess.

Its answers from a real GCS are in tests/integration/test_node_agent.py (liveness, and the
agent's retry of a Ray that never registered)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

# Ray's generated modules import the whole `ray` package: once, here, not inside a timed call.
import ray.core.generated.gcs_service_pb2_grpc  # noqa: F401

from cluster.join.service import GcsLiveness
from cluster.join.tickets import LivenessUnknown
from cluster.node.gcs import GcsUnavailable, instance_nodes


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("t0ken\n")
    return path


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_gcs_that_is_down_is_unavailable_within_the_timeout(token: Path) -> None:
    started = time.monotonic()
    with pytest.raises(GcsUnavailable, match="no answer from the GCS"):
        instance_nodes(_closed_port(), token, "hf-x", timeout_s=1.0)
    assert time.monotonic() - started < 5.0


def test_a_gcs_that_never_answers_is_unavailable_after_the_timeout(token: Path) -> None:
    with socket.socket() as silent:  # accepts the connection, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(GcsUnavailable):
            instance_nodes(address, token, "hf-x", timeout_s=1.0)
        assert 0.9 < time.monotonic() - started < 5.0


def test_an_unreadable_token_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(GcsUnavailable):
        instance_nodes(_closed_port(), tmp_path / "missing", "hf-x", timeout_s=1.0)


def test_liveness_unknown_when_the_gcs_is_down(token: Path) -> None:
    liveness = GcsLiveness(_closed_port(), token, timeout_s=1.0)
    with pytest.raises(LivenessUnknown) as unknown:
        liveness("hf-x")
    assert unknown.value.retry_after_s == 1.0
