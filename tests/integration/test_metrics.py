"""The in-Ray metrics as Prometheus reads them: the node's Ray metrics endpoint serves the
ingress's and the replicas' ``ray_hyperfleet_*`` series with the values the traffic made, and
their labels are bounded (500 sessions make no series that one session did not).

Ray exports what processes record every ``metrics_report_interval_ms`` (10 s by default), and a
replica sets its gauges every few seconds (``actors/metrics.py``), so every check polls the
endpoint with a deadline rather than reading it once.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from .api_client import Client, new_session, new_user
from .conftest import ApiServer

EXPORT_WAIT_S = 90.0
POLL_S = 1.0
SESSIONS = 500
# Labels Ray puts on every series: the recording process's, not ours.
RAY_LABELS = frozenset(
    {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
    | {"otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
)
_SAMPLE = re.compile(r"^(ray_hyperfleet_\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]
Series = tuple[str, frozenset[tuple[str, str]]]

pytestmark = pytest.mark.timeout(400)


def _metrics_url() -> str:
    """The metrics endpoint of this single-node cluster's one node (Ray's node table says
    which port its metrics agent serves)."""
    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    assert len(ports) == 1, ports
    return f"http://127.0.0.1:{ports[0]}/metrics"


def scrape(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum over processes of ``name``'s samples that have ``labels``."""
    return sum(
        value
        for n, have, value in samples
        if n == name and all(have.get(k) == v for k, v in labels.items())
    )


def series(samples: list[Sample]) -> set[Series]:
    """Each series with Ray's per-process labels left out: what our labels make."""
    return {
        (name, frozenset((k, v) for k, v in labels.items() if k not in RAY_LABELS))
        for name, labels, _ in samples
    }


def wait_for(url: str, check: Callable[[list[Sample]], bool], what: str) -> list[Sample]:
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:
        samples = scrape(url)
        if check(samples):
            return samples
        if time.monotonic() >= deadline:
            names = sorted({n for n, _, _ in samples})
            raise AssertionError(f"{what}: not exported in {EXPORT_WAIT_S:g} s; seen {names}")
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def user(api_server: ApiServer) -> Iterator[Client]:
    admin = Client(api_server.base_url, api_server.admin_key)
    client = new_user(admin, api_server, requests_per_minute=100_000, max_sessions=1_000)
    yield client
    client.http.close()
    admin.http.close()


SETTLED_S = 6.0  # longer than Ray's metrics report interval (5 s)
COUNTED = (
    "ray_hyperfleet_turns_total",
    "ray_hyperfleet_http_requests_total",
    "ray_hyperfleet_agent_spawns_total",
    "ray_hyperfleet_replica_start_seconds_count",
    "ray_hyperfleet_model_calls_total",
)


def settled(url: str) -> list[Sample]:
    """A scrape once the counters stand still for ``SETTLED_S``: what earlier tests did (their
    processes report on their own schedules) is in it, so a delta from it is this test's."""
    deadline = time.monotonic() + EXPORT_WAIT_S
    last = scrape(url)
    while True:
        time.sleep(SETTLED_S)
        now = scrape(url)
        if all(total(now, n) == total(last, n) for n in COUNTED):
            return now
        if time.monotonic() >= deadline:
            raise AssertionError(f"the counters did not settle in {EXPORT_WAIT_S:g} s")
        last = now


def test_turns_and_refusals_show_with_their_values(api_server: ApiServer, user: Client) -> None:
    url = _metrics_url()
    before = settled(url)
    agent = user.ok("POST", "/v1/agents", 201, json={"tools": ["bash"], "max_sessions": 7})
    committed = "ray_hyperfleet_turns_total"
    messages = {"route": "/v1/sessions/{session_id}/messages", "method": "POST"}
    session = new_session(user, agent["id"])
    user.ok("POST", f"/v1/sessions/{session}/messages", json={"content": "hello"})
    user.ok("POST", f"/v1/sessions/{session}/messages", json={"content": "and again"})
    tool = '[[tool bash {"command": "echo metered"}]]'
    user.ok("POST", f"/v1/sessions/{session}/messages", json={"content": tool})
    stranger = Client(api_server.base_url, "hf_not_a_key")
    assert stranger.request("GET", "/v1/agents").status_code == 401
    assert user.request("GET", f"/v1/nothing/here/{session}").status_code == 404

    def delta(samples: list[Sample], name: str, **labels: str) -> float:
        return total(samples, name, **labels) - total(before, name, **labels)

    def exported(samples: list[Sample]) -> bool:
        # Each process (two ingress replicas, the agent's replica) reports on its own schedule:
        # wait until every one of them has reported what is checked below.
        return (
            delta(samples, committed, outcome="committed") >= 3
            and delta(samples, "ray_hyperfleet_turn_duration_seconds_count") >= 3
            and delta(samples, "ray_hyperfleet_turn_first_event_seconds_count") >= 3
            and delta(samples, "ray_hyperfleet_http_requests_total", **messages) >= 3
            and delta(samples, "ray_hyperfleet_http_requests_total", route="unmatched") >= 1
            and delta(samples, "ray_hyperfleet_model_calls_total", outcome="ok") >= 4
            and delta(samples, "ray_hyperfleet_tool_calls_total", tool="bash") >= 1
            and delta(samples, "ray_hyperfleet_store_commit_seconds_count", store="actor") >= 3
            and delta(samples, "ray_hyperfleet_agent_spawns_total", outcome="ready") >= 1
            and delta(samples, "ray_hyperfleet_replica_start_seconds_count") >= 1
            and total(samples, "ray_hyperfleet_sessions_active", agent=agent["id"]) >= 1
            and total(samples, "ray_hyperfleet_session_capacity", agent=agent["id"]) >= 7
            and delta(samples, "ray_hyperfleet_admission_rejections_total", reason="auth") >= 1
        )

    after = wait_for(url, exported, "three turns, a session and a 401")
    # At least: the counters are the cluster's, and a turn an earlier test left running (a
    # client that went away) may land in the window; the per-agent gauges below are exact.
    assert delta(after, committed, outcome="committed") >= 3
    assert delta(after, "ray_hyperfleet_turn_duration_seconds_count") >= 3
    assert delta(after, "ray_hyperfleet_turn_first_event_seconds_count") >= 3
    assert delta(after, "ray_hyperfleet_http_requests_total", status_class="2xx", **messages) >= 3
    assert delta(after, "ray_hyperfleet_http_requests_total", route="unmatched") >= 1
    assert delta(after, "ray_hyperfleet_model_calls_total", outcome="ok") >= 4  # a tool: 2
    assert delta(after, "ray_hyperfleet_tool_calls_total", tool="bash", outcome="ok") >= 1
    assert delta(after, "ray_hyperfleet_tokens_total", kind="input") > 0
    assert delta(after, "ray_hyperfleet_cost_usd_total") > 0
    assert delta(after, "ray_hyperfleet_store_commit_seconds_count", store="actor") >= 3
    assert delta(after, "ray_hyperfleet_agent_spawns_total", outcome="ready") >= 1
    assert delta(after, "ray_hyperfleet_replica_start_seconds_count") >= 1
    assert total(after, "ray_hyperfleet_sessions_active", agent=agent["id"]) == 1
    assert total(after, "ray_hyperfleet_session_capacity", agent=agent["id"]) == 7
    assert total(after, "ray_hyperfleet_turns_running", agent=agent["id"]) == 0
    assert total(after, "ray_hyperfleet_replicas", state="ready") >= 1
    # Other modules' replicas may have opened their breakers: only that each replica reports.
    assert any(name == "ray_hyperfleet_circuit_state" for name, _, _ in after)
    # Only bounded label values: no id a client made, no raw path.
    for _, labels, _ in after:
        ours = {k: v for k, v in labels.items() if k not in RAY_LABELS}
        assert not any(v.startswith(("ses_", "usr_", "turn_", "hf_")) for v in ours.values())
        assert session not in ours.get("route", "")
    user.ok("DELETE", f"/v1/agents/{agent['id']}")


POOL_PREFIX = "ray_hyperfleet_pool_"


def _not_pool(found: set[Series]) -> set[Series]:
    return {s for s in found if not s[0].startswith(POOL_PREFIX)}


def test_500_sessions_make_no_more_series_than_one(user: Client) -> None:
    url = _metrics_url()
    agent = user.ok("POST", "/v1/agents", 201, json={"max_sessions": 1_000})
    gauge = "ray_hyperfleet_sessions_active"
    requests = "ray_hyperfleet_http_requests_total"
    routes = [
        ("POST", "/v1/agents/{agent_id}/sessions"),
        ("POST", "/v1/sessions/{session_id}/messages"),
        ("GET", "/v1/sessions/{session_id}/messages"),
    ]
    before = scrape(url)
    first = new_session(user, agent["id"])
    user.ok("POST", f"/v1/sessions/{first}/messages", json={"content": "one session"})
    user.ok("GET", f"/v1/sessions/{first}/messages")

    def one_session(samples: list[Sample]) -> bool:
        # Every route the 500 sessions use has answered once, and the gauge counts one.
        answered = all(
            total(samples, requests, method=m, route=r) > total(before, requests, method=m, route=r)
            for m, r in routes
        )
        return answered and total(samples, gauge, agent=agent["id"]) == 1

    one = series(wait_for(url, one_session, "the first session's turn and gauge"))

    with ThreadPoolExecutor(8) as pool:
        opened = list(pool.map(lambda _: new_session(user, agent["id"]), range(SESSIONS)))
    for session in opened[:5]:
        user.ok("POST", f"/v1/sessions/{session}/messages", json={"content": "many sessions"})
        user.ok("GET", f"/v1/sessions/{session}/messages")

    def all_sessions(samples: list[Sample]) -> bool:
        return total(samples, gauge, agent=agent["id"]) == SESSIONS + 1

    many = series(wait_for(url, all_sessions, f"{SESSIONS + 1} sessions in the gauge"))
    # The pool controller's decision counters gain a series per reason as its ticks see the
    # pool change (bounded: REASONS x directions), on its own clock, not per session.
    new = _not_pool(many - one)
    assert new == set(), sorted(new)[:10]
    assert len(_not_pool(many)) <= len(_not_pool(one))
    assert any(name == gauge for name, _ in many)
    user.ok("DELETE", f"/v1/agents/{agent['id']}")
