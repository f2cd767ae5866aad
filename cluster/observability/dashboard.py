"""The Hyperfleet Grafana dashboard, generated as code with grafanalib.

Design:
- The panels are data (`_SECTIONS`): a title, a unit, a description and PromQL targets.
  `dashboard()` lays them out; `panel_queries()` hands the same expressions to the integration
  tier, which runs each against a real Prometheus after real traffic. So an expression uses no
  Grafana variable but the datasource (no `$__rate_interval`, no `$instance`): what Grafana runs
  is what the test runs.
- Rates use a fixed `[5m]` window, as Ray's own dashboards do
  (`ray/dashboard/modules/metrics/dashboards/serve_dashboard_panels.py`): two scrapes of a counter
  in five minutes are enough for a series, whatever the scrape interval.
- A query returns series once its metric exists and has seen traffic. `or vector(0)` appears only
  where zero is the meaningful answer and the query is not grouped: an error ratio's numerator
  (no 5xx series yet means none failed) and an ungrouped count of rare events (circuit opens,
  swept usage records, Ray worker failures, capped pool replicas, moved sessions). A grouped query
  never gets it, because the unlabelled zero would sit beside the real series as a phantom one; a
  grouped count of events that may not have happened yet (replica start failures, store errors,
  pool replica starts) gets `or on() vector(0)`, a zero only while no series exists.
- Metric names are those of `docs/observability.md`'s catalogue (Prometheus renames
  `ray_hyperfleet_*` to `hyperfleet_*`), plus Ray's node metrics (`ray_node_*`, from Ray's
  reporter agent) and one raylet counter (`ray_node_manager_unexpected_worker_failure_total`).
- The datasource is a variable, `${datasource}`, as in Ray's dashboards, so the JSON imports into
  any Grafana whatever its Prometheus datasource is called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from grafanalib._gen import DashboardEncoder  # type: ignore[import-untyped]
from grafanalib.core import (  # type: ignore[import-untyped]
    GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
    Dashboard,
    GridPos,
    RowPanel,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

__all__ = ["DASHBOARD_TITLE", "DASHBOARD_UID", "dashboard", "dashboard_json", "panel_queries"]

DASHBOARD_TITLE = "Hyperfleet"
DASHBOARD_UID = "hyperfleet-overview"
DATASOURCE = "${datasource}"

# Grafana 9 and later read this schema; older exports are migrated on import.
_SCHEMA_VERSION = 36
_RATE_WINDOW = "5m"
_GRID_WIDTH = 24
_PANELS_PER_ROW = 3
_PANEL_HEIGHT = 8
_ROW_HEIGHT = 1


@dataclass(frozen=True)
class _Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class _PanelSpec:
    title: str
    unit: str
    description: str
    queries: tuple[_Query, ...]


@dataclass(frozen=True)
class _Section:
    title: str
    panels: tuple[_PanelSpec, ...]


def _rate(selector: str) -> str:
    return f"rate({selector}[{_RATE_WINDOW}])"


def _increase(selector: str) -> str:
    return f"increase({selector}[{_RATE_WINDOW}])"


def _quantiles(
    histogram: str, by: tuple[str, ...] = (), levels: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> tuple[_Query, ...]:
    """Quantiles (p50, p95 and p99 unless ``levels`` says) of a histogram's `_bucket` series,
    optionally per label."""
    grouping = ", ".join((*by, "le"))
    legend_labels = " ".join(f"{{{{{label}}}}}" for label in by)
    queries = []
    for quantile in levels:
        name = f"p{quantile * 100:g}"
        expr = (
            f"histogram_quantile({quantile}, sum by ({grouping}) ({_rate(histogram + '_bucket')}))"
        )
        queries.append(_Query(expr, f"{legend_labels} {name}".strip()))
    return tuple(queries)


def _error_ratio(counter: str, error_matcher: str) -> str:
    # No error series yet means no errors: the numerator falls back to zero, the denominator does
    # not (with no traffic at all there is no ratio to show).
    return (
        f"(sum({_rate(counter + '{' + error_matcher + '}')}) or vector(0)) / sum({_rate(counter)})"
    )


_SECTIONS: tuple[_Section, ...] = (
    _Section(
        "Sessions and capacity",
        (
            _PanelSpec(
                "Active sessions vs capacity",
                "short",
                "Sessions held in memory by all agents' replicas, and how many their live replicas "
                "can hold (max_sessions each).",
                (
                    _Query("sum(hyperfleet_sessions_active)", "active"),
                    _Query("sum(hyperfleet_session_capacity)", "capacity"),
                ),
            ),
            _PanelSpec(
                "Sessions as a fraction of capacity",
                "percentunit",
                "Active sessions over capacity, in all and per agent. Alerts warn at 0.8 and 0.95.",
                (
                    _Query(
                        "sum(hyperfleet_sessions_active) / sum(hyperfleet_session_capacity)",
                        "all agents",
                    ),
                    _Query(
                        "sum by (agent) (hyperfleet_sessions_active)"
                        " / sum by (agent) (hyperfleet_session_capacity)",
                        "{{agent}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Sessions and running turns by agent",
                "short",
                "Sessions held and turns running now, per agent.",
                (
                    _Query("sum by (agent) (hyperfleet_sessions_active)", "{{agent}} sessions"),
                    _Query("sum by (agent) (hyperfleet_turns_running)", "{{agent}} turns running"),
                ),
            ),
        ),
    ),
    _Section(
        "HTTP",
        (
            _PanelSpec(
                "Requests by route and status",
                "reqps",
                "Requests answered by the ingress per second, by route template and status class.",
                (
                    _Query(
                        f"sum by (route, status_class) ({_rate('hyperfleet_http_requests_total')})",
                        "{{route}} {{status_class}}",
                    ),
                ),
            ),
            _PanelSpec(
                "HTTP error ratio",
                "percentunit",
                "The share of requests answered 5xx, and 4xx. Zero when none failed.",
                (
                    _Query(
                        _error_ratio("hyperfleet_http_requests_total", 'status_class="5xx"'), "5xx"
                    ),
                    _Query(
                        _error_ratio("hyperfleet_http_requests_total", 'status_class="4xx"'), "4xx"
                    ),
                ),
            ),
            _PanelSpec(
                "HTTP latency",
                "s",
                "Time from a request's arrival at the ingress to its answer's first byte: p50, "
                "p95, p99 over all routes.",
                _quantiles("hyperfleet_http_request_duration_seconds"),
            ),
            _PanelSpec(
                "HTTP p95 latency by route",
                "s",
                "p95 time to first byte per route template.",
                (
                    _Query(
                        "histogram_quantile(0.95, sum by (route, le) "
                        f"({_rate('hyperfleet_http_request_duration_seconds_bucket')}))",
                        "{{route}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Admission rejections by reason",
                "reqps",
                "Requests refused before any work: rate, auth, quota, budget, capacity, circuit, "
                "unavailable.",
                (
                    _Query(
                        f"sum by (reason) ({_rate('hyperfleet_admission_rejections_total')})",
                        "{{reason}}",
                    ),
                ),
            ),
        ),
    ),
    _Section(
        "Turns, tokens and cost",
        (
            _PanelSpec(
                "Turn duration",
                "s",
                "A turn's wall time in its replica, first model call to commit: p50, p95, p99.",
                _quantiles("hyperfleet_turn_duration_seconds"),
            ),
            _PanelSpec(
                "Time to first event",
                "s",
                "From a turn's start to its first text or tool event: p50, p95, p99.",
                _quantiles("hyperfleet_turn_first_event_seconds"),
            ),
            _PanelSpec(
                "Turns by outcome",
                "ops",
                "Turns finished per second by model and outcome (committed, replayed, failed, "
                "timeout, budget, cancelled).",
                (
                    _Query(
                        f"sum by (model, outcome) ({_rate('hyperfleet_turns_total')})",
                        "{{model}} {{outcome}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Tokens by kind and model",
                "short",
                "Tokens metered per second: input, output, cache_read, cache_write.",
                (
                    _Query(
                        f"sum by (model, kind) ({_rate('hyperfleet_tokens_total')})",
                        "{{model}} {{kind}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Cost per hour",
                "currencyUSD",
                "List-price cost of the metered tokens at the current rate, USD per hour.",
                (
                    _Query(f"sum({_rate('hyperfleet_cost_usd_total')}) * 3600", "all models"),
                    _Query(
                        f"sum by (model) ({_rate('hyperfleet_cost_usd_total')}) * 3600",
                        "{{model}}",
                    ),
                ),
            ),
        ),
    ),
    _Section(
        "Model API",
        (
            _PanelSpec(
                "Model calls by outcome",
                "ops",
                "Model API calls (stream attempts) per second: ok, or the error type.",
                (
                    _Query(
                        f"sum by (model, outcome) ({_rate('hyperfleet_model_calls_total')})",
                        "{{model}} {{outcome}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Model call error ratio",
                "percentunit",
                "The share of model calls that did not end ok. Zero when none failed.",
                (_Query(_error_ratio("hyperfleet_model_calls_total", 'outcome!="ok"'), "errors"),),
            ),
            _PanelSpec(
                "Model call latency",
                "s",
                "One model call, request to its last stream event: p50, p95, p99.",
                _quantiles("hyperfleet_model_call_duration_seconds"),
            ),
            _PanelSpec(
                "Circuit breaker state",
                "short",
                "The worst breaker in any replica (0 closed, 1 half-open, 2 open), and how many "
                f"breakers opened in the last {_RATE_WINDOW} (zero when none did).",
                (
                    _Query("max(hyperfleet_circuit_state)", "state (2 = open)"),
                    _Query(
                        f"sum({_increase('hyperfleet_circuit_opens_total')}) or vector(0)",
                        "opens",
                    ),
                ),
            ),
        ),
    ),
    _Section(
        "Agents and replicas",
        (
            _PanelSpec(
                "Replicas by state",
                "short",
                "Agent replicas: loading (model client starting), ready, draining.",
                (_Query("sum by (state) (hyperfleet_replicas)", "{{state}}"),),
            ),
            _PanelSpec(
                "Agent spawns and replica start failures",
                "short",
                f"Agents created in the last {_RATE_WINDOW} by outcome, and replicas that did not "
                "start by reason.",
                (
                    _Query(
                        f"sum by (outcome) ({_increase('hyperfleet_agent_spawns_total')})",
                        "spawn {{outcome}}",
                    ),
                    _Query(
                        # A counter that only failures create: "none" is a zero line, not
                        # "No data" (``or on()`` adds it only when no failure series exists).
                        f"sum by (reason) ({_increase('hyperfleet_replica_start_failures_total')})"
                        " or on() vector(0)",
                        "start failure {{reason}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Replica start time",
                "s",
                "From the ingress asking for an agent's replicas to all of them answering: p50, "
                "p95, p99.",
                _quantiles("hyperfleet_replica_start_seconds"),
            ),
        ),
    ),
    _Section(
        "Agent pools",
        (
            _PanelSpec(
                "Pool replicas by state",
                "short",
                "Agent pools' replicas, all agents, as the pool controller saw them at its last "
                "tick: desired (the policy's target), ready, starting (asked of Ray, not yet "
                "answering: waiting for a node or a VM), draining. Desired above ready for long: "
                "see starting, VMs by state and Hypercore calls.",
                (_Query("sum by (state) (hyperfleet_pool_replicas)", "{{state}}"),),
            ),
            _PanelSpec(
                "Pool replicas by agent",
                "short",
                "Each agent's pool: desired, ready, starting, draining replicas.",
                (
                    _Query(
                        "sum by (agent, state) (hyperfleet_pool_replicas)", "{{agent}} {{state}}"
                    ),
                ),
            ),
            _PanelSpec(
                "Scaling decisions",
                "ops",
                "The pool controller's decisions per second (one per agent per tick) by direction "
                "(up, down, hold) and reason: hold at_max means an agent wants more than its max.",
                (
                    _Query(
                        f"sum by (direction, reason) ({_rate('hyperfleet_pool_decisions_total')})",
                        "{{direction}} {{reason}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Pool replica starts and capped replicas",
                "short",
                f"Replicas the pool controller started in the last {_RATE_WINDOW} by outcome "
                "(ready, failed), and replicas a scale-up wanted that the fleet's cap or an "
                "owner's quota refused (zero when none).",
                (
                    _Query(
                        # Zero lines, not "No data", before the first start or refusal.
                        f"sum by (outcome) ({_increase('hyperfleet_pool_replica_starts_total')})"
                        " or on() vector(0)",
                        "start {{outcome}}",
                    ),
                    _Query(
                        f"sum({_increase('hyperfleet_pool_capped_replicas_total')}) or vector(0)",
                        "capped",
                    ),
                ),
            ),
            _PanelSpec(
                "Pool replica start time",
                "s",
                "From the pool controller asking Ray for a replica to its first health answer, a "
                "new VM included: p50, p95.",
                _quantiles("hyperfleet_pool_replica_start_seconds", levels=(0.5, 0.95)),
            ),
            _PanelSpec(
                "Pool drain time",
                "s",
                "From a replica's drain to its stop (its running turns finished, its sessions "
                "moved): p50, p95.",
                _quantiles("hyperfleet_pool_drain_seconds", levels=(0.5, 0.95)),
            ),
            _PanelSpec(
                "Sessions moved off drained replicas",
                "ops",
                "Session routes moved to other ready replicas when a drained replica stops, per "
                "second (zero when none).",
                (
                    _Query(
                        f"sum({_rate('hyperfleet_pool_sessions_moved_total')}) or vector(0)",
                        "sessions moved",
                    ),
                ),
            ),
        ),
    ),
    _Section(
        "Tools and session store",
        (
            _PanelSpec(
                "Tool calls by tool and outcome",
                "ops",
                "Tool runs per second: ok, error, timeout.",
                (
                    _Query(
                        f"sum by (tool, outcome) ({_rate('hyperfleet_tool_calls_total')})",
                        "{{tool}} {{outcome}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Tool duration p95 by tool",
                "s",
                "p95 of one tool run, per tool.",
                (
                    _Query(
                        "histogram_quantile(0.95, sum by (tool, le) "
                        f"({_rate('hyperfleet_tool_duration_seconds_bucket')}))",
                        "{{tool}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Store commit latency",
                "s",
                "A turn's commit in the session store, per backend: p50, p95, p99.",
                _quantiles("hyperfleet_store_commit_seconds", by=("store",)),
            ),
            _PanelSpec(
                "Store errors and swept usage",
                "short",
                "Session-store failures per second by backend and error (stale, conflict, "
                f"unavailable), and usage records a sweep found in the outbox in the last "
                f"{_RATE_WINDOW} (zero when none).",
                (
                    _Query(
                        f"sum by (store, error) ({_rate('hyperfleet_store_errors_total')})"
                        " or on() vector(0)",  # zero when none, as above
                        "{{store}} {{error}}",
                    ),
                    _Query(
                        f"sum({_increase('hyperfleet_usage_outbox_swept_total')}) or vector(0)",
                        "outbox swept",
                    ),
                ),
            ),
        ),
    ),
    _Section(
        "Nodes, VMs and Hypercore",
        (
            _PanelSpec(
                "VMs by node type and state",
                "short",
                "VMs the node provider knows, by node type and Hypercore state.",
                (_Query("sum by (node_type, state) (hyperfleet_vms)", "{{node_type}} {{state}}"),),
            ),
            _PanelSpec(
                "Hypercore calls and error ratio",
                "ops",
                "The node provider's calls to Hypercore per second by method and outcome, and the "
                "share that failed (zero when none did).",
                (
                    _Query(
                        "sum by (method, outcome) "
                        f"({_rate('hyperfleet_hypercore_requests_total')})",
                        "{{method}} {{outcome}}",
                    ),
                    _Query(
                        _error_ratio("hyperfleet_hypercore_requests_total", 'outcome!="ok"'),
                        "error ratio",
                    ),
                ),
            ),
            _PanelSpec(
                "Hypercore call latency p95 by method",
                "s",
                "p95 of one Hypercore call, per method.",
                (
                    _Query(
                        "histogram_quantile(0.95, sum by (method, le) "
                        f"({_rate('hyperfleet_hypercore_request_duration_seconds_bucket')}))",
                        "{{method}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Node agents by state",
                "short",
                "Node agents by what they are doing: starting, joining, running, parked, stopping.",
                (_Query("sum by (state) (hyperfleet_node_state)", "{{state}}"),),
            ),
            _PanelSpec(
                "Node joins",
                "short",
                f"Join requests at the head's join service, and node agents' join attempts, in the "
                f"last {_RATE_WINDOW} by outcome.",
                (
                    _Query(
                        f"sum by (outcome) ({_increase('hyperfleet_join_attempts_total')})",
                        "join service {{outcome}}",
                    ),
                    _Query(
                        f"sum by (outcome) ({_increase('hyperfleet_node_joins_total')})",
                        "node agent {{outcome}}",
                    ),
                ),
            ),
        ),
    ),
    _Section(
        "Ray nodes",
        (
            _PanelSpec(
                "Node CPU utilisation",
                "percent",
                "CPU use per Ray node (Ray's reporter agent, ray_node_cpu_utilization).",
                (_Query("max by (instance) (ray_node_cpu_utilization)", "{{instance}}"),),
            ),
            _PanelSpec(
                "Node memory utilisation",
                "percentunit",
                "Memory used over total per Ray node (ray_node_mem_used / ray_node_mem_total).",
                (
                    _Query(
                        "sum by (instance) (ray_node_mem_used)"
                        " / sum by (instance) (ray_node_mem_total)",
                        "{{instance}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Node disk utilisation",
                "percentunit",
                "Disk used over used plus free per Ray node.",
                (
                    _Query(
                        "sum by (instance) (ray_node_disk_usage) / (sum by (instance) "
                        "(ray_node_disk_usage) + sum by (instance) (ray_node_disk_free))",
                        "{{instance}}",
                    ),
                ),
            ),
            _PanelSpec(
                "Ray worker failures",
                "short",
                "Worker processes (replicas, actors) that died unexpectedly in the last "
                f"{_RATE_WINDOW}, all nodes (zero when none did).",
                (
                    _Query(
                        f"sum({_increase('ray_node_manager_unexpected_worker_failure_total')})"
                        " or vector(0)",
                        "all nodes",
                    ),
                ),
            ),
        ),
    ),
)


def _panel(spec: _PanelSpec, panel_id: int, x: int, y: int) -> TimeSeries:
    ref_ids = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return TimeSeries(
        id=panel_id,
        title=spec.title,
        description=spec.description,
        dataSource=DATASOURCE,
        unit=spec.unit,
        targets=[
            Target(expr=q.expr, legendFormat=q.legend, refId=ref_ids[i], datasource=DATASOURCE)
            for i, q in enumerate(spec.queries)
        ],
        gridPos=GridPos(h=_PANEL_HEIGHT, w=_GRID_WIDTH // _PANELS_PER_ROW, x=x, y=y),
        legendDisplayMode="table",
        tooltipMode="multi",
    )


def dashboard() -> Dashboard:
    """The Hyperfleet dashboard: one row per section, three panels a line.

    Returns:
        A grafanalib `Dashboard` with a deterministic uid (`DASHBOARD_UID`) and ids.
    """
    panels: list[RowPanel | TimeSeries] = []
    panel_id = 0
    y = 0
    for section in _SECTIONS:
        panel_id += 1
        panels.append(
            RowPanel(
                id=panel_id,
                title=section.title,
                gridPos=GridPos(h=_ROW_HEIGHT, w=_GRID_WIDTH, x=0, y=y),
            )
        )
        y += _ROW_HEIGHT
        for index, spec in enumerate(section.panels):
            panel_id += 1
            column = index % _PANELS_PER_ROW
            if index and column == 0:
                y += _PANEL_HEIGHT
            panels.append(_panel(spec, panel_id, column * (_GRID_WIDTH // _PANELS_PER_ROW), y))
        y += _PANEL_HEIGHT
    return Dashboard(
        title=DASHBOARD_TITLE,
        uid=DASHBOARD_UID,
        description="Hyperfleet: sessions, HTTP, turns, model API, replicas, agent pools, store, "
        "VMs, nodes. "
        "Generated by cluster/observability/dashboard.py; edit that, not the JSON.",
        tags=["hyperfleet"],
        editable=True,
        graphTooltip=GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        schemaVersion=_SCHEMA_VERSION,
        refresh="30s",
        time=Time("now-1h", "now"),
        templating=Templating(
            list=[
                Template(
                    name="datasource",
                    label="Data source",
                    query="prometheus",
                    type="datasource",
                    hide=0,
                )
            ]
        ),
        panels=panels,
    )


def dashboard_json() -> str:
    """The dashboard as Grafana JSON, keys sorted, so the same code gives the same bytes."""
    return json.dumps(dashboard().to_json_data(), sort_keys=True, indent=2, cls=DashboardEncoder)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel, in dashboard order."""
    return [
        (spec.title, query.expr)
        for section in _SECTIONS
        for spec in section.panels
        for query in spec.queries
    ]


def main() -> None:
    """Print the dashboard JSON: `python -m cluster.observability.dashboard > hyperfleet.json`."""
    print(dashboard_json())


if __name__ == "__main__":
    main()
