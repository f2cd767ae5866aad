"""The metrics' labels stay bounded, and refusals and failures map to the catalogue's names
(``docs/observability.md``), without Ray: the recorded points are caught by stand-in metric
objects in place of Ray's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from actors import CircuitBreaker, SqliteSessionStore, metrics
from actors.loop import AgentLoop, LoopConfig, status_outcome
from actors.pricing import Usage
from actors.store import SessionRecord, TurnRecord
from actors.store.actor import ActorSessionStore
from actors.store.metered import MeteredStore, store_error
from actors.tools import Tool, ToolResult, Workspace
from autoscaling import pool_metrics
from autoscaling.pool import PoolStatus
from autoscaling.pool_policy import REASONS
from hyperfleet.errors import (
    BudgetExceededError,
    CapacityError,
    CircuitOpenError,
    IdempotencyConflictError,
    NotFoundError,
    StaleSessionError,
    StoreError,
)
from serve_app import metrics as ingress_metrics
from serve_app.errors import ApiError, OverBudgetError, QuotaExceededError, not_found, unavailable
from serve_app.routes import TEMPLATES

CATALOGUE = Path(__file__).resolve().parents[2] / "docs" / "observability.md"


@dataclass
class Points:
    """A stand-in for one Ray metric: what was recorded, with its tags."""

    points: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def record(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.points.append((value, dict(tags or {})))

    inc = observe = set = record


class Caught:
    """An ``Instruments`` whose metric objects are ``Points``."""

    def __init__(self, kind: type) -> None:
        self.made = kind(**{f.name: Points() for f in fields(kind)})

    def get(self) -> Any:
        return self.made


@pytest.fixture
def replica(monkeypatch: pytest.MonkeyPatch) -> Any:
    caught = Caught(metrics._Replica)
    monkeypatch.setattr(metrics, "_REPLICA", caught)
    return caught.made


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Any:
    caught = Caught(pool_metrics._Pool)
    monkeypatch.setattr(pool_metrics, "_POOL", caught)
    return caught.made


@pytest.fixture
def ingress(monkeypatch: pytest.MonkeyPatch) -> Any:
    caught = Caught(ingress_metrics._Ingress)
    monkeypatch.setattr(ingress_metrics, "_INGRESS", caught)
    return caught.made


def test_nothing_is_recorded_outside_ray_or_when_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    made: list[int] = []
    instruments = metrics.Instruments(lambda: made.append(1) or len(made))
    # Not connected (a run with the integration tier may have connected this process: say not).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert instruments.get() is None
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for value, on in (("0", False), ("off", False), ("1", True), ("", True)):
        metrics.enabled.cache_clear()
        monkeypatch.setenv(metrics.METRICS_ENV, value)
        assert metrics.enabled() is on
        if not on:
            assert instruments.get() is None
    assert made == []
    assert instruments.get() == 1 and instruments.get() == 1  # made once, when connected and on
    metrics.enabled.cache_clear()


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("claude-sonnet-5-5", "claude-sonnet-5-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("my-fine-tune-of-the-week", "other"),
        ("claude-sonnet-5-5-20260101", "claude-sonnet-5-5"),
        ("claude-sonnetish", "other"),
    ],
)
def test_a_model_is_labelled_by_its_price_table_name(model: str, label: str) -> None:
    assert metrics.model_label(model) == label


def test_tool_and_store_labels_are_bounded(tmp_path: Path) -> None:
    tools = {"bash": object()}
    assert metrics.tool_label("bash", tools) == "bash"
    assert metrics.tool_label("rm -rf / as a tool name", tools) == "unknown"
    assert metrics.store_label(SqliteSessionStore(tmp_path / "s.db")) == "sqlite"
    assert metrics.store_label(ActorSessionStore(handle=object())) == "actor"
    assert MeteredStore(SqliteSessionStore(tmp_path / "t.db")).label == "sqlite"
    assert metrics.store_label(object()) == "other"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (StaleSessionError("behind"), "stale"),
        (IdempotencyConflictError("taken"), "conflict"),
        (StoreError("down"), "unavailable"),
        (NotFoundError("no session"), None),
    ],
)
def test_store_failures_by_kind(error: Exception, kind: str | None) -> None:
    assert store_error(error) == kind


async def test_a_metered_store_times_commits_and_counts_only_failures(
    tmp_path: Path, replica: Any
) -> None:
    store = MeteredStore(SqliteSessionStore(tmp_path / "s.db"))
    await store.create_session(SessionRecord("ses_1", "agt_1", "usr_1", 0.0))
    await store.commit_turn(_turn("ses_1", "turn_1"), 0)
    with pytest.raises(StaleSessionError):
        await store.commit_turn(_turn("ses_1", "turn_2"), 0)
    with pytest.raises(NotFoundError):  # an answer, not a failure of the store
        await store.commit_turn(_turn("ses_none", "turn_3"), 0)
    assert [tags for _, tags in replica.store_commit_seconds.points] == [{"store": "sqlite"}]
    assert [tags for _, tags in replica.store_errors.points] == [
        {"store": "sqlite", "error": "stale"}
    ]


def _turn(session_id: str, turn_id: str) -> TurnRecord:
    return TurnRecord(session_id, 1, turn_id, "d", [], "end_turn", {}, 0.0, "m", 0.0, 1)


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (429, None, "rate_limit"),
        (529, None, "overloaded"),
        (400, None, "refused"),
        (413, None, "refused"),
        (500, None, "api_error"),
        (200, {"type": "error", "error": {"type": "overloaded_error"}}, "overloaded"),
        (200, {"type": "error", "error": {"type": "rate_limit_error"}}, "rate_limit"),
        (200, {"type": "error", "error": {"type": "api_error"}}, "api_error"),
    ],
)
def test_model_call_failures_by_status(status: int, body: Any, outcome: str) -> None:
    assert status_outcome(status, body) == outcome


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ApiError(429, "rate_limited", "slow down"), "rate"),
        (ApiError(401, "unauthorized", "invalid API key"), "auth"),
        (QuotaExceededError("max_agents"), "quota"),
        (OverBudgetError("this turn may use 9 tokens"), "budget"),
        (CapacityError("full"), "capacity"),
        (CircuitOpenError("open"), "circuit"),
        (unavailable("the control store", TimeoutError()), "unavailable"),
        (StoreError("down"), "unavailable"),
        (not_found("session ses_x"), None),
        (ApiError(400, "invalid_request", "bad body"), None),
        (ApiError(403, "forbidden", "admins only"), None),
        (BudgetExceededError("ran out during the turn"), None),
    ],
)
def test_refusals_map_to_the_catalogues_reasons(error: Exception, reason: str | None) -> None:
    assert ingress_metrics.rejection_reason(error) == reason


def test_an_over_budget_refusal_is_a_quota_answer_that_survives_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(OverBudgetError("over")))  # noqa: S301 - our own bytes
    assert isinstance(error, OverBudgetError) and error.status_code == 403
    assert error.error_type == "quota_exceeded"


@pytest.mark.parametrize(
    ("status", "label"), [(200, "2xx"), (201, "2xx"), (429, "4xx"), (503, "5xx"), (999, "5xx")]
)
def test_status_classes(status: int, label: str) -> None:
    assert ingress_metrics.status_class(status) == label


def _app() -> Starlette:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    routes = [Route(t, ok, methods=["GET", "POST", "DELETE", "PATCH"]) for t in TEMPLATES]
    routes.append(Route("/boom", boom))
    middleware = [Middleware(ingress_metrics.RequestMetrics, templates=TEMPLATES)]
    return Starlette(routes=routes, middleware=middleware)


def test_requests_are_labelled_by_route_template_never_the_path(ingress: Any) -> None:
    client = TestClient(_app(), raise_server_exceptions=False)
    for n in range(5):
        assert client.post(f"/v1/sessions/ses_{n}/messages").status_code == 200
    client.get(f"/v1/no/such/{'x' * 50}")
    client.request("BREW", "/v1/agents")
    client.get("/boom")
    labels = {tuple(sorted(tags.items())) for _, tags in ingress.requests.points}
    assert labels == {
        (
            ("method", "POST"),
            ("route", "/v1/sessions/{session_id}/messages"),
            ("status_class", "2xx"),
        ),
        (("method", "GET"), ("route", "unmatched"), ("status_class", "4xx")),
        (("method", "other"), ("route", "/v1/agents"), ("status_class", "4xx")),  # 405
        (("method", "GET"), ("route", "unmatched"), ("status_class", "5xx")),  # not a template
    }
    assert len(ingress.request_seconds.points) == 8
    assert all(seconds >= 0 for seconds, _ in ingress.request_seconds.points)


def test_an_agent_that_is_not_ready_counts_its_replicas_as_start_failures(ingress: Any) -> None:
    ingress_metrics.agent_spawned("ready", 2, 1.5)
    ingress_metrics.agent_spawned("pending", 2)
    ingress_metrics.agent_spawned("failed", 3)
    assert [t["outcome"] for _, t in ingress.agent_spawns.points] == ["ready", "pending", "failed"]
    assert ingress.replica_start_seconds.points == [(1.5, {})]
    assert ingress.replica_start_failures.points == [
        (2, {"reason": "timeout"}),
        (3, {"reason": "failed"}),
    ]


async def test_tool_runs_are_labelled_by_tool_and_outcome(tmp_path: Path, replica: Any) -> None:
    async def slow(tool_input: dict[str, Any], workspace: Workspace) -> ToolResult:
        return ToolResult("timed out", is_error=True, timed_out=True)

    tool = Tool("slow", "a slow tool", {"type": "object"}, slow)
    loop = AgentLoop(
        client=None,  # type: ignore[arg-type]
        config=LoopConfig("claude-sonnet-5-5", "", 100, 1),
        tools={"slow": tool},
        breaker=CircuitBreaker(),
    )
    workspace = Workspace(tmp_path / "ws")
    await loop._run_tool({"name": "slow", "input": {}}, workspace)
    await loop._run_tool({"name": "an invented tool", "input": {}}, workspace)
    assert [tags for _, tags in replica.tool_calls.points] == [
        {"tool": "slow", "outcome": "timeout"},
        {"tool": "unknown", "outcome": "error"},
    ]


def test_tokens_are_counted_by_kind_and_zeros_are_skipped(replica: Any) -> None:
    metrics.tokens_used("claude-sonnet-5-5", Usage(input_tokens=10, output_tokens=5))
    assert [(v, t["kind"]) for v, t in replica.tokens.points] == [(10, "input"), (5, "output")]
    assert replica.cost.points[0][0] == pytest.approx(10 * 3e-6 + 5 * 15e-6)
    metrics.tokens_used("claude-sonnet-5-5", Usage())
    assert len(replica.tokens.points) == 2 and len(replica.cost.points) == 1


def test_a_breaker_counts_each_opening_once() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=lambda: now[0])
    opened: list[int] = []
    original = metrics.circuit_opened
    metrics.circuit_opened = lambda: opened.append(1)  # type: ignore[assignment]
    try:
        for _ in range(4):  # calls in flight when it opened fail too: still one opening
            breaker.record_failure()
        now[0] = 11.0
        assert breaker.check() is True  # the half-open trial
        breaker.record_failure(trial=True)
    finally:
        metrics.circuit_opened = original  # type: ignore[assignment]
    assert len(opened) == 2


@pytest.mark.parametrize(
    ("stats", "client", "expected"),
    [
        (
            {"sessions": 3, "capacity": 100, "busy_sessions": 1, "draining": False},
            "ready",
            (3, 100, 1, "ready"),
        ),
        (
            {"sessions": 0, "capacity": 100, "busy_sessions": 0, "draining": False},
            "loading",
            (0, 100, 0, "loading"),
        ),
        (
            {"sessions": 2, "capacity": 100, "busy_sessions": 2, "draining": True},
            "ready",
            (2, 0, 2, "draining"),
        ),
    ],
)
def test_replica_gauges(
    stats: dict[str, Any], client: str, expected: tuple[Any, ...], replica: Any
) -> None:
    gauges = metrics.replica_gauges({**stats, "agent_id": "agt_1", "breaker": "open"}, client)
    assert (gauges.sessions, gauges.capacity, gauges.turns_running, gauges.state) == expected
    metrics.report_replica(gauges)
    states = {t["state"]: v for v, t in replica.replicas.points}
    assert states == {s: int(s == expected[3]) for s in metrics.REPLICA_STATES}
    assert replica.circuit_state.points == [(2, {})]
    assert replica.sessions_active.points == [(expected[0], {"agent": "agt_1"})]


def _catalogued_values(metric: str) -> set[str]:
    """The backquoted words of ``metric``'s row in docs/observability.md's catalogue."""
    (row,) = [
        line for line in CATALOGUE.read_text().splitlines() if line.startswith(f"| `{metric}`")
    ]
    return set(re.findall(r"`([a-z_]+)`", row))


def test_pool_labels_are_the_catalogues(pool: Any) -> None:
    status = PoolStatus(
        desired=3, reason="utilisation", ready=1, starting=2, draining=0, sessions=9
    )
    pool_metrics.pool("agt_1", status.counts())
    states = {t["state"]: v for v, t in pool.replicas.points}
    assert states == {"desired": 3, "ready": 1, "starting": 2, "draining": 0}
    assert set(states) <= _catalogued_values("hyperfleet_pool_replicas")
    for delta in (2, -1, 0):
        pool_metrics.decided("steady", delta)
    directions = [t["direction"] for _, t in pool.decisions.points]
    assert directions == ["up", "down", "hold"]
    # Every reason the policy can give is explained in the catalogue.
    assert {*REASONS, *directions} <= _catalogued_values("hyperfleet_pool_decisions_total")


def test_pool_counts_of_nothing_are_not_recorded(pool: Any) -> None:
    # Ray's Counter.inc(0) raises (Ray 2.60): a drain that moved no session and a step up the cap
    # did not touch record nothing.
    pool_metrics.capped(0)
    pool_metrics.drained(1.5, 0)
    pool_metrics.started("failed")
    assert pool.capped.points == [] and pool.sessions_moved.points == []
    assert pool.drain_seconds.points == [(1.5, {})]
    assert pool.starts.points == [(1, {"outcome": "failed"})]
    assert pool.start_seconds.points == []  # a failed start has no start time
    pool_metrics.capped(2)
    pool_metrics.drained(3.0, 4)
    pool_metrics.started("ready", 0.4)
    assert pool.capped.points == [(2, {})] and pool.sessions_moved.points == [(4, {})]
    assert pool.start_seconds.points == [(0.4, {})]
