"""The client's own behaviour: connecting, unreachable hosts, and the gRPC Logs quirk.

Everything a stand-in can answer is in tests/integration/test_hypercore_conformance.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from cluster.cli.commands import build_parser, main
from cluster.hypercore import (
    HypercoreClient,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    SpawnRequest,
    UnknownWorkload,
)
from cluster.hypercore.transports import HttpTransport, _unwrap_logs


@pytest.fixture
def closed_address() -> Iterator[str]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_an_unreachable_host_is_unavailable_and_retryable(
    closed_address: str, transport: str
) -> None:
    with HypercoreClient.connect(closed_address, transport=transport, timeout_s=2.0) as client:  # type: ignore[arg-type]
        for call in (client.list, lambda: client.stop("x"), lambda: client.logs("x")):
            with pytest.raises(HypercoreUnavailable) as error:
                call()
            assert error.value.retryable
        with pytest.raises(HypercoreUnavailable):
            client.spawn(SpawnRequest(cores=1, memory_mb=64, image_ref="r:1"))


def test_a_bad_request_never_leaves_the_client(closed_address: str) -> None:
    request = SpawnRequest(cores=1, memory_mb=64, image_ref="r:1", ports={1: 65536})
    client = HypercoreClient.connect(closed_address, transport="http")
    # InvalidSpawnRequest, not HypercoreUnavailable: nothing was sent.
    with client, pytest.raises(InvalidSpawnRequest):
        client.spawn(request)


def test_connect_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="transport"):
        HypercoreClient.connect("127.0.0.1:1", transport="smtp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="HOST:PORT"):
        HttpTransport("localhost")
    with pytest.raises(ValueError, match="timeout_s"):
        HypercoreClient.connect("127.0.0.1:1", timeout_s=0)


def test_grpc_logs_unwraps_the_mirror_body_hypercore_forwards() -> None:
    assert _unwrap_logs('{"response":"line\\n"}\n') == "line\n"
    assert _unwrap_logs("plain text, as a future Hypercore might send") == (
        "plain text, as a future Hypercore might send"
    )
    assert _unwrap_logs('{"other": 1}') == '{"other": 1}'
    with pytest.raises(UnknownWorkload):
        _unwrap_logs('{"error":"open /tmp/hypercore/x: no such file or directory"}\n')


def test_the_standin_command_defaults_avoid_the_api_port() -> None:
    args = build_parser().parse_args(["hypercore", "serve"])
    assert args.grpc_bind_addr == "127.0.0.1:8100"
    assert args.http_bind_addr == "127.0.0.1:8101"
    assert args.refresh_interval_s == 5.0 and args.image_catalog is None


def test_the_standin_command_explains_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hypercore", "serve", "--image-catalog", "/nonexistent/c.json"]) == 2
    assert "/nonexistent/c.json" in capsys.readouterr().err
    assert main(["hypercore", "serve", "--grpc-bind-addr", "nowhere"]) == 2
    assert "--grpc-bind-addr" in capsys.readouterr().err
    assert main(["hypercore", "serve", "--refresh-interval-s", "0"]) == 2
    assert "--refresh-interval-s" in capsys.readouterr().err
