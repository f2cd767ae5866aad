"""Metrics of the processes outside Ray: the join service's ``/metrics``, the node agent's
server, and the provider's Hypercore outcomes and process-wide server, read as Prometheus reads
them (the text format, over HTTP where there is a port)."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from autoscaling import provider_metrics
from autoscaling.provider_metrics import MeteredTransport, metrics_host, outcome_of, report_vms
from cluster.hypercore import (
    CapacityExceeded,
    HypercoreError,
    HypercoreUnavailable,
    InvalidSpawnRequest,
    UnknownWorkload,
)
from cluster.join.consoles import DirectoryConsoles
from cluster.join.service import RateLimiter, build_app
from cluster.join.tickets import InstanceState, TicketBook
from cluster.node.join_key import NodeKey, console_line
from cluster.node.metrics import JoinAttempt, NodeMetrics, NodeState
from hyperfleet.processes import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---- the join service ---------------------------------------------------------------------


def always_alive(instance_id: str) -> InstanceState:
    return InstanceState.ALIVE


def test_the_join_service_counts_each_answer_by_outcome(tmp_path: Path) -> None:
    book = TicketBook(tmp_path / "join.db")
    token_file = tmp_path / "token"
    token_file.write_text("the-token\n")
    consoles = tmp_path / "consoles"
    consoles.mkdir()
    limiter = RateLimiter(per_min=60, burst=6, clock=lambda: 0.0)
    client = TestClient(
        build_app(book, token_file, always_alive, DirectoryConsoles(consoles), limiter=limiter)
    )
    before = parse(client.get("/metrics").text)
    # Every outcome is a series from the start, at zero.
    for outcome in ("joined", "refused", "unattested", "invalid", "rate_limited", "unavailable"):
        assert value(before, "hyperfleet_join_attempts_total", outcome=outcome) == 0.0

    ticket = book.mint("vm-1", ttl_s=60)
    key = NodeKey.generate()
    thief = NodeKey.generate()
    (consoles / "vm-1.log").write_text(console_line(key.fingerprint) + "\n")
    now = time.time()
    answers = [
        client.post("/v1/join", json=thief.signed_request(ticket, "vm-1", now)),  # 409 unattested
        client.post("/v1/join", json=key.signed_request("made-up", "vm-1", now)),  # 401 refused
        client.post("/v1/join", content=b"not json"),  # 400 invalid
        client.post("/v1/join", json=key.signed_request(ticket, "vm-1", now)),  # 200 joined
        client.post("/v1/join", json=key.signed_request(ticket, "vm-1", now)),  # 409 in use
        client.post("/v1/join", content=b"{}"),  # 400 invalid
        client.post("/v1/join", content=b"{}"),  # 429: the bucket of 6 is empty
    ]
    assert [a.status_code for a in answers] == [409, 401, 400, 200, 409, 400, 429]

    response = client.get("/metrics")  # not rate limited, not authenticated
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = parse(response.text)
    counts = {
        outcome: value(after, "hyperfleet_join_attempts_total", outcome=outcome)
        for outcome in ("joined", "refused", "unattested", "invalid", "rate_limited")
    }
    assert counts == {"joined": 1, "refused": 2, "unattested": 1, "invalid": 2, "rate_limited": 1}
    # Counts only: no ticket, instance id or key reaches the scrape.
    assert ticket not in response.text and "vm-1" not in response.text
    assert key.fingerprint not in response.text
    book.close()


def test_each_join_app_counts_on_its_own(tmp_path: Path) -> None:
    book = TicketBook(tmp_path / "join.db")
    apps = [
        TestClient(build_app(book, tmp_path / "t", always_alive, DirectoryConsoles(tmp_path)))
        for _ in range(2)
    ]
    apps[0].post("/v1/join", content=b"{}")
    counted = [
        value(parse(app.get("/metrics").text), "hyperfleet_join_attempts_total", outcome="invalid")
        for app in apps
    ]
    assert counted == [1.0, 0.0]
    book.close()


# ---- the node agent -----------------------------------------------------------------------


def test_the_node_agent_serves_its_joins_and_state_over_http() -> None:
    metrics = NodeMetrics()
    port = free_port()
    server = metrics.serve("127.0.0.1", port)
    assert server is not None
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        samples = scrape(url)
        assert value(samples, "hyperfleet_node_state", state="starting") == 1.0
        assert value(samples, "hyperfleet_node_joins_total", outcome="joined") == 0.0
        for outcome in (JoinAttempt.RETRY, JoinAttempt.RETRY, JoinAttempt.JOINED):
            metrics.count_join(outcome)
        metrics.set_state(NodeState.RUNNING)
        samples = scrape(url)
        assert value(samples, "hyperfleet_node_joins_total", outcome="retry") == 2.0
        assert value(samples, "hyperfleet_node_joins_total", outcome="joined") == 1.0
        assert value(samples, "hyperfleet_node_joins_total", outcome="failed") == 0.0
        states = {
            s.value: value(samples, "hyperfleet_node_state", state=s.value) for s in NodeState
        }
        assert states == {s.value: float(s is NodeState.RUNNING) for s in NodeState}
        # Only the agent's own metrics: none of the process's default registry.
        assert not any(name.startswith(("python_", "process_")) for name, _ in samples)
    finally:
        server.shutdown()
        server.server_close()


def test_a_node_agent_port_of_0_or_taken_serves_nothing_and_does_not_fail() -> None:
    assert NodeMetrics().serve("127.0.0.1", 0) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert NodeMetrics().serve("127.0.0.1", taken.getsockname()[1]) is None


# ---- the node provider --------------------------------------------------------------------


class _Deadline(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED


def _unavailable_from(cause: BaseException) -> HypercoreUnavailable:
    try:
        raise HypercoreUnavailable("Spawn: no answer") from cause
    except HypercoreUnavailable as e:
        return e


def test_hypercore_outcomes_are_the_kind_of_error_never_its_text() -> None:
    assert outcome_of(UnknownWorkload("workload x does not exist")) == "unknown_workload"
    assert outcome_of(CapacityExceeded("cannot spawn container: ...")) == "capacity_exceeded"
    assert outcome_of(InvalidSpawnRequest("got invalid port 70000")) == "invalid_request"
    assert outcome_of(HypercoreError("something new")) == "error"
    assert outcome_of(_unavailable_from(ConnectionRefusedError())) == "unavailable"
    assert outcome_of(_unavailable_from(TimeoutError())) == "timeout"
    assert outcome_of(_unavailable_from(_Deadline())) == "timeout"


class _Failing:
    def call(self, method: str, request: object, timeout_s: float) -> object:
        raise CapacityExceeded("cannot spawn container: have capacity for 2 vCPUs")

    def close(self) -> None:
        pass


def test_a_refused_call_is_counted_timed_and_raised_as_it_was() -> None:
    samples = parse(generate_latest(provider_metrics.REGISTRY).decode())
    calls = value(
        samples, "hyperfleet_hypercore_requests_total", method="Spawn", outcome="capacity_exceeded"
    )
    timed = value(samples, "hyperfleet_hypercore_request_duration_seconds_count", method="Spawn")
    with pytest.raises(CapacityExceeded):
        MeteredTransport(_Failing()).call("Spawn", object(), 1.0)
    samples = parse(generate_latest(provider_metrics.REGISTRY).decode())
    assert (
        value(
            samples,
            "hyperfleet_hypercore_requests_total",
            method="Spawn",
            outcome="capacity_exceeded",
        )
        == calls + 1
    )
    assert (
        value(samples, "hyperfleet_hypercore_request_duration_seconds_count", method="Spawn")
        == timed + 1
    )


def test_vms_of_a_node_type_that_is_gone_go_to_zero() -> None:
    report_vms({("ut-cpu", "running"): 2, ("ut-gpu", "spawned"): 1})
    report_vms({("ut-cpu", "stopping"): 2})
    samples = parse(generate_latest(provider_metrics.REGISTRY).decode())
    got = {
        (node_type, state): value(samples, "hyperfleet_vms", node_type=node_type, state=state)
        for node_type in ("ut-cpu", "ut-gpu")
        for state in ("running", "spawned", "stopping")
    }
    assert got == {
        ("ut-cpu", "running"): 0,
        ("ut-cpu", "spawned"): 0,
        ("ut-cpu", "stopping"): 2,
        ("ut-gpu", "running"): 0,
        ("ut-gpu", "spawned"): 0,
        ("ut-gpu", "stopping"): 0,
    }


def test_the_metrics_host_is_the_heads_address() -> None:
    assert metrics_host("10.88.0.2:6385") == "10.88.0.2"
    assert metrics_host("[fd00::2]:6385") == "fd00::2"
    assert metrics_host(None) is None and metrics_host("") is None
    assert metrics_host("no-port") is None


def test_the_provider_serves_once_per_address_per_process() -> None:
    port = free_port()
    assert provider_metrics.serve("127.0.0.1", port)
    # A second provider instance in this process: no second bind (which would fail).
    assert provider_metrics.serve("127.0.0.1", port)
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert (
        "hyperfleet_hypercore_requests_total",
        frozenset({("method", "List"), ("outcome", "ok")}),
    ) in samples
    assert not any(name.startswith(("python_", "process_")) for name, _ in samples)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert not provider_metrics.serve("127.0.0.1", taken.getsockname()[1])
