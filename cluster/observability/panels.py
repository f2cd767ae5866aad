"""What the Hyperfleet dashboard shows: its sections of panels, as data.

- A panel is a title, a unit, a description and PromQL targets; ``dashboard.py`` lays them out.
  An expression uses no Grafana variable but the datasource (no `$__rate_interval`, no
  `$instance`): what Grafana runs is what the integration tests run.
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
"""

from __future__ import annotations

from dataclasses import dataclass

RATE_WINDOW = "5m"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    unit: str
    description: str
    queries: tuple[Query, ...]


@dataclass(frozen=True)
class Section:
    title: str
    panels: tuple[PanelSpec, ...]


def _rate(selector: str) -> str:
    return f"rate({selector}[{RATE_WINDOW}])"


def _increase(selector: str) -> str:
    return f"increase({selector}[{RATE_WINDOW}])"


def _quantiles(
    histogram: str, by: tuple[str, ...] = (), levels: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> tuple[Query, ...]:
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
        queries.append(Query(expr, f"{legend_labels} {name}".strip()))
    return tuple(queries)


def _error_ratio(counter: str, error_matcher: str) -> str:
    # No error series yet means no errors: the numerator falls back to zero, the denominator does
    # not (with no traffic at all there is no ratio to show).
    return (
        f"(sum({_rate(counter + '{' + error_matcher + '}')}) or vector(0)) / sum({_rate(counter)})"
    )


SECTIONS: tuple[Section, ...] = (
    Section(
        "Sessions and capacity",
        (
            PanelSpec(
                "Active sessions vs capacity",
                "short",
                "Sessions held in memory by all agents' replicas, and how many their live replicas "
                "can hold (max_sessions each).",
                (
                    Query("sum(hyperfleet_sessions_active)", "active"),
                    Query("sum(hyperfleet_session_capacity)", "capacity"),
                ),
            ),
            PanelSpec(
                "Sessions as a fraction of capacity",
                "percentunit",
                "Active sessions over capacity, in all and per agent. Alerts warn at 0.8 and 0.95.",
                (
                    Query(
                        "sum(hyperfleet_sessions_active) / sum(hyperfleet_session_capacity)",
                        "all agents",
                    ),
                    Query(
                        "sum by (agent) (hyperfleet_sessions_active)"
                        " / sum by (agent) (hyperfleet_session_capacity)",
                        "{{agent}}",
                    ),
                ),
            ),
            PanelSpec(
                "Sessions and running turns by agent",
                "short",
                "Sessions held and turns running now, per agent.",
                (
                    Query("sum by (agent) (hyperfleet_sessions_active)", "{{agent}} sessions"),
                    Query("sum by (agent) (hyperfleet_turns_running)", "{{agent}} turns running"),
                ),
            ),
        ),
    ),
    Section(
        "HTTP",
        (
            PanelSpec(
                "Requests by route and status",
                "reqps",
                "Requests answered by the ingress per second, by route template and status class.",
                (
                    Query(
                        f"sum by (route, status_class) ({_rate('hyperfleet_http_requests_total')})",
                        "{{route}} {{status_class}}",
                    ),
                ),
            ),
            PanelSpec(
                "HTTP error ratio",
                "percentunit",
                "The share of requests answered 5xx, and 4xx. Zero when none failed.",
                (
                    Query(
                        _error_ratio("hyperfleet_http_requests_total", 'status_class="5xx"'), "5xx"
                    ),
                    Query(
                        _error_ratio("hyperfleet_http_requests_total", 'status_class="4xx"'), "4xx"
                    ),
                ),
            ),
            PanelSpec(
                "HTTP latency",
                "s",
                "Time from a request's arrival at the ingress to its answer's first byte: p50, "
                "p95, p99 over all routes.",
                _quantiles("hyperfleet_http_request_duration_seconds"),
            ),
            PanelSpec(
                "HTTP p95 latency by route",
                "s",
                "p95 time to first byte per route template.",
                (
                    Query(
                        "histogram_quantile(0.95, sum by (route, le) "
                        f"({_rate('hyperfleet_http_request_duration_seconds_bucket')}))",
                        "{{route}}",
                    ),
                ),
            ),
            PanelSpec(
                "Admission rejections by reason",
                "reqps",
                "Requests refused before any work: rate, auth, quota, budget, capacity, circuit, "
                "unavailable.",
                (
                    Query(
                        f"sum by (reason) ({_rate('hyperfleet_admission_rejections_total')})",
                        "{{reason}}",
                    ),
                ),
            ),
        ),
    ),
    Section(
        "Turns, tokens and cost",
        (
            PanelSpec(
                "Turn duration",
                "s",
                "A turn's wall time in its replica, first model call to commit: p50, p95, p99.",
                _quantiles("hyperfleet_turn_duration_seconds"),
            ),
            PanelSpec(
                "Time to first event",
                "s",
                "From a turn's start to its first text or tool event: p50, p95, p99.",
                _quantiles("hyperfleet_turn_first_event_seconds"),
            ),
            PanelSpec(
                "Turns by outcome",
                "ops",
                "Turns finished per second by model and outcome (committed, replayed, failed, "
                "timeout, budget, cancelled).",
                (
                    Query(
                        f"sum by (model, outcome) ({_rate('hyperfleet_turns_total')})",
                        "{{model}} {{outcome}}",
                    ),
                ),
            ),
            PanelSpec(
                "Tokens by kind and model",
                "short",
                "Tokens metered per second: input, output, cache_read, cache_write.",
                (
                    Query(
                        f"sum by (model, kind) ({_rate('hyperfleet_tokens_total')})",
                        "{{model}} {{kind}}",
                    ),
                ),
            ),
            PanelSpec(
                "Cost per hour",
                "currencyUSD",
                "List-price cost of the metered tokens at the current rate, USD per hour.",
                (
                    Query(f"sum({_rate('hyperfleet_cost_usd_total')}) * 3600", "all models"),
                    Query(
                        f"sum by (model) ({_rate('hyperfleet_cost_usd_total')}) * 3600",
                        "{{model}}",
                    ),
                ),
            ),
        ),
    ),
    Section(
        "Model API",
        (
            PanelSpec(
                "Model calls by outcome",
                "ops",
                "Model API calls (stream attempts) per second: ok, or the error type.",
                (
                    Query(
                        f"sum by (model, outcome) ({_rate('hyperfleet_model_calls_total')})",
                        "{{model}} {{outcome}}",
                    ),
                ),
            ),
            PanelSpec(
                "Model call error ratio",
                "percentunit",
                "The share of model calls that did not end ok. Zero when none failed.",
                (Query(_error_ratio("hyperfleet_model_calls_total", 'outcome!="ok"'), "errors"),),
            ),
            PanelSpec(
                "Model call latency",
                "s",
                "One model call, request to its last stream event: p50, p95, p99.",
                _quantiles("hyperfleet_model_call_duration_seconds"),
            ),
            PanelSpec(
                "Circuit breaker state",
                "short",
                "The worst breaker in any replica (0 closed, 1 half-open, 2 open), and how many "
                f"breakers opened in the last {RATE_WINDOW} (zero when none did).",
                (
                    Query("max(hyperfleet_circuit_state)", "state (2 = open)"),
                    Query(
                        f"sum({_increase('hyperfleet_circuit_opens_total')}) or vector(0)",
                        "opens",
                    ),
                ),
            ),
        ),
    ),
    Section(
        "Agents and replicas",
        (
            PanelSpec(
                "Replicas by state",
                "short",
                "Agent replicas: loading (model client starting), ready, draining.",
                (Query("sum by (state) (hyperfleet_replicas)", "{{state}}"),),
            ),
            PanelSpec(
                "Agent spawns and replica start failures",
                "short",
                f"Agents created in the last {RATE_WINDOW} by outcome, and replicas that did not "
                "start by reason.",
                (
                    Query(
                        f"sum by (outcome) ({_increase('hyperfleet_agent_spawns_total')})",
                        "spawn {{outcome}}",
                    ),
                    Query(
                        # A counter that only failures create: "none" is a zero line, not
                        # "No data" (``or on()`` adds it only when no failure series exists).
                        f"sum by (reason) ({_increase('hyperfleet_replica_start_failures_total')})"
                        " or on() vector(0)",
                        "start failure {{reason}}",
                    ),
                ),
            ),
            PanelSpec(
                "Replica start time",
                "s",
                "From the ingress asking for an agent's replicas to all of them answering: p50, "
                "p95, p99.",
                _quantiles("hyperfleet_replica_start_seconds"),
            ),
        ),
    ),
    Section(
        "Agent pools",
        (
            PanelSpec(
                "Pool replicas by state",
                "short",
                "Agent pools' replicas, all agents, as the pool controller saw them at its last "
                "tick: desired (the policy's target), ready, starting (asked of Ray, not yet "
                "answering: waiting for a node or a VM), draining. Desired above ready for long: "
                "see starting, VMs by state and Hypercore calls.",
                (Query("sum by (state) (hyperfleet_pool_replicas)", "{{state}}"),),
            ),
            PanelSpec(
                "Pool replicas by agent",
                "short",
                "Each agent's pool: desired, ready, starting, draining replicas.",
                (Query("sum by (agent, state) (hyperfleet_pool_replicas)", "{{agent}} {{state}}"),),
            ),
            PanelSpec(
                "Scaling decisions",
                "ops",
                "The pool controller's decisions per second (one per agent per tick) by direction "
                "(up, down, hold) and reason: hold at_max means an agent wants more than its max.",
                (
                    Query(
                        f"sum by (direction, reason) ({_rate('hyperfleet_pool_decisions_total')})",
                        "{{direction}} {{reason}}",
                    ),
                ),
            ),
            PanelSpec(
                "Pool replica starts, capped and replaced replicas",
                "short",
                f"Replicas the pool controller started in the last {RATE_WINDOW} by outcome "
                "(ready, failed), replicas a scale-up wanted that the fleet's cap or an "
                "owner's quota refused, and ready replicas replaced because they stopped "
                "answering (zero when none).",
                (
                    Query(
                        # Zero lines, not "No data", before the first start or refusal.
                        f"sum by (outcome) ({_increase('hyperfleet_pool_replica_starts_total')})"
                        " or on() vector(0)",
                        "start {{outcome}}",
                    ),
                    Query(
                        f"sum({_increase('hyperfleet_pool_capped_replicas_total')}) or vector(0)",
                        "capped",
                    ),
                    Query(
                        f"sum({_increase('hyperfleet_pool_replicas_replaced_total')}) or vector(0)",
                        "replaced (unresponsive)",
                    ),
                ),
            ),
            PanelSpec(
                "Pool replica start time",
                "s",
                "From the pool controller asking Ray for a replica to its first health answer, a "
                "new VM included: p50, p95.",
                _quantiles("hyperfleet_pool_replica_start_seconds", levels=(0.5, 0.95)),
            ),
            PanelSpec(
                "Pool drain time",
                "s",
                "From a replica's drain to its stop (its running turns finished, its sessions "
                "moved): p50, p95.",
                _quantiles("hyperfleet_pool_drain_seconds", levels=(0.5, 0.95)),
            ),
            PanelSpec(
                "Sessions moved off drained replicas",
                "ops",
                "Session routes moved to other ready replicas when a drained replica stops, per "
                "second (zero when none).",
                (
                    Query(
                        f"sum({_rate('hyperfleet_pool_sessions_moved_total')}) or vector(0)",
                        "sessions moved",
                    ),
                ),
            ),
        ),
    ),
    Section(
        "Tools and session store",
        (
            PanelSpec(
                "Tool calls by tool and outcome",
                "ops",
                "Tool runs per second: ok, error, timeout.",
                (
                    Query(
                        f"sum by (tool, outcome) ({_rate('hyperfleet_tool_calls_total')})",
                        "{{tool}} {{outcome}}",
                    ),
                ),
            ),
            PanelSpec(
                "Tool duration p95 by tool",
                "s",
                "p95 of one tool run, per tool.",
                (
                    Query(
                        "histogram_quantile(0.95, sum by (tool, le) "
                        f"({_rate('hyperfleet_tool_duration_seconds_bucket')}))",
                        "{{tool}}",
                    ),
                ),
            ),
            PanelSpec(
                "Store commit latency",
                "s",
                "A turn's commit in the session store, per backend: p50, p95, p99.",
                _quantiles("hyperfleet_store_commit_seconds", by=("store",)),
            ),
            PanelSpec(
                "Store errors and swept usage",
                "short",
                "Session-store failures per second by backend and error (stale, conflict, "
                f"unavailable), and usage records a sweep found in the outbox in the last "
                f"{RATE_WINDOW} (zero when none).",
                (
                    Query(
                        f"sum by (store, error) ({_rate('hyperfleet_store_errors_total')})"
                        " or on() vector(0)",  # zero when none, as above
                        "{{store}} {{error}}",
                    ),
                    Query(
                        f"sum({_increase('hyperfleet_usage_outbox_swept_total')}) or vector(0)",
                        "outbox swept",
                    ),
                ),
            ),
        ),
    ),
    Section(
        "Nodes, VMs and Hypercore",
        (
            PanelSpec(
                "VMs by node type and state",
                "short",
                "VMs the node provider knows, by node type and Hypercore state.",
                (Query("sum by (node_type, state) (hyperfleet_vms)", "{{node_type}} {{state}}"),),
            ),
            PanelSpec(
                "Hypercore calls and error ratio",
                "ops",
                "The node provider's calls to Hypercore per second by method and outcome, and the "
                "share that failed (zero when none did).",
                (
                    Query(
                        "sum by (method, outcome) "
                        f"({_rate('hyperfleet_hypercore_requests_total')})",
                        "{{method}} {{outcome}}",
                    ),
                    Query(
                        _error_ratio("hyperfleet_hypercore_requests_total", 'outcome!="ok"'),
                        "error ratio",
                    ),
                ),
            ),
            PanelSpec(
                "Hypercore call latency p95 by method",
                "s",
                "p95 of one Hypercore call, per method.",
                (
                    Query(
                        "histogram_quantile(0.95, sum by (method, le) "
                        f"({_rate('hyperfleet_hypercore_request_duration_seconds_bucket')}))",
                        "{{method}}",
                    ),
                ),
            ),
            PanelSpec(
                "Node agents by state",
                "short",
                "Node agents by what they are doing: starting, joining, running, parked, stopping.",
                (Query("sum by (state) (hyperfleet_node_state)", "{{state}}"),),
            ),
            PanelSpec(
                "Node joins",
                "short",
                f"Join requests at the head's join service, and node agents' join attempts, in the "
                f"last {RATE_WINDOW} by outcome.",
                (
                    Query(
                        f"sum by (outcome) ({_increase('hyperfleet_join_attempts_total')})",
                        "join service {{outcome}}",
                    ),
                    Query(
                        f"sum by (outcome) ({_increase('hyperfleet_node_joins_total')})",
                        "node agent {{outcome}}",
                    ),
                ),
            ),
        ),
    ),
    Section(
        "Ray nodes",
        (
            PanelSpec(
                "Node CPU utilisation",
                "percent",
                "CPU use per Ray node (Ray's reporter agent, ray_node_cpu_utilization).",
                (Query("max by (instance) (ray_node_cpu_utilization)", "{{instance}}"),),
            ),
            PanelSpec(
                "Node memory utilisation",
                "percentunit",
                "Memory used over total per Ray node (ray_node_mem_used / ray_node_mem_total).",
                (
                    Query(
                        "sum by (instance) (ray_node_mem_used)"
                        " / sum by (instance) (ray_node_mem_total)",
                        "{{instance}}",
                    ),
                ),
            ),
            PanelSpec(
                "Node disk utilisation",
                "percentunit",
                "Disk used over used plus free per Ray node.",
                (
                    Query(
                        "sum by (instance) (ray_node_disk_usage) / (sum by (instance) "
                        "(ray_node_disk_usage) + sum by (instance) (ray_node_disk_free))",
                        "{{instance}}",
                    ),
                ),
            ),
            PanelSpec(
                "Ray worker failures",
                "short",
                "Worker processes (replicas, actors) that died unexpectedly in the last "
                f"{RATE_WINDOW}, all nodes (zero when none did).",
                (
                    Query(
                        f"sum({_increase('ray_node_manager_unexpected_worker_failure_total')})"
                        " or vector(0)",
                        "all nodes",
                    ),
                ),
            ),
        ),
    ),
)
