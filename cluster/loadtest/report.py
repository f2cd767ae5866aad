"""What a load test measured, aggregated, judged against its thresholds, and written as JSON.

The JSON layout is ``LoadTestReport``; ``docs/loadtest.md`` documents every field and a unit
test keeps the two in step. Its names follow ``vllm bench serve``'s result file where the
quantity is the same (``completed``, ``failed``, ``duration``, ``request_throughput``,
``total_input_tokens``, ``mean_/median_/std_/p99_ttft_ms``, ``..._e2el_ms``), so tooling that
reads those files reads these; the rest (errors by status, retries, the timeline, thresholds,
the client's own load) are Hyperfleet's. ``schema_version`` changes only when a field changes
meaning or goes away; new fields may be added within a version.

Latency is what a user waits: from a request's first attempt to its answer, retries and their
waits included. Latency percentiles are over completed messages; the success rate is over
every request (messages, and session opens that failed: their messages were never sent).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1
# Where a request that got no HTTP answer is counted in ``errors_by_status``.
NO_RESPONSE = "no_response"


@dataclass(frozen=True)
class Outcome:
    """One request as its virtual user saw it. Times are seconds since the load began."""

    op: Literal["message", "open_session"]
    start_s: float
    end_s: float
    ok: bool
    # The HTTP status, or an SSE ``error`` event's ``status_code``; None: no answer at all.
    status: int | None = None
    # The API's error type, or the client's: ``connection``, ``timeout``, ``protocol``.
    error_type: str | None = None
    ttft_s: float | None = None
    # (seconds since the load began, why) for each attempt that was retried.
    retries: tuple[tuple[float, str], ...] = ()
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    tool_call: bool = False

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail criteria. Latencies are end to end, in seconds, over completed messages."""

    p95_max_s: float = 3.0
    p99_max_s: float = 10.0
    success_min: float = 0.99
    rps_min: float | None = None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Model):
    """How the load was shaped (the command's flags)."""

    mode: Literal["closed", "open"]
    users: int
    requests: int
    think_time_s: float
    ramp_up_s: float
    duration_s: float | None
    stream: bool
    tools_mix: float
    rate: float | None
    timeout_s: float
    max_retries: int
    seed: int


class Retries(_Model):
    total: int
    by_reason: dict[str, int]


class TimelineBucket(_Model):
    """One second of the run: requests started and ended in it, and the latency of those that
    completed in it."""

    second: int
    started: int
    completed: int
    failed: int
    retries: int
    in_flight: int
    output_tokens: int
    median_e2el_ms: float | None
    p95_e2el_ms: float | None


class ThresholdsOut(_Model):
    p95_max_s: float
    p99_max_s: float
    success_min: float
    rps_min: float | None


class ClientStats(_Model):
    """The load generator's own load: a saturated client measures itself, not the API."""

    processes: int
    cpu_s: float
    cpu_percent: float
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    dropped_arrivals: int
    warnings: list[str]


class LoadTestReport(_Model):
    """The result file of ``hyperfleet loadtest --json``; see docs/loadtest.md."""

    schema_version: int
    tool: str
    date: str
    started_at: float = 0.0  # absent from reports written before it
    api_url: str
    config: RunConfig
    duration: float
    num_requests: int
    completed: int
    failed: int
    success_rate: float
    sessions_opened: int
    tool_calls: int
    max_concurrency: int | None
    request_rate: float | None
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    total_cache_read_input_tokens: int
    total_cost_usd: float
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    std_ttft_ms: float | None
    p90_ttft_ms: float | None
    p95_ttft_ms: float | None
    p99_ttft_ms: float | None
    max_ttft_ms: float | None
    mean_e2el_ms: float | None
    median_e2el_ms: float | None
    std_e2el_ms: float | None
    p90_e2el_ms: float | None
    p95_e2el_ms: float | None
    p99_e2el_ms: float | None
    max_e2el_ms: float | None
    errors_by_status: dict[str, int]
    errors_by_type: dict[str, int]
    retries: Retries
    timeline: list[TimelineBucket]
    thresholds: ThresholdsOut
    passed: bool
    failed_criteria: list[str]
    client: ClientStats


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0 to 100) by linear interpolation between closest ranks, as
    numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def _stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std, p90, p95, p99 and max, in milliseconds (None for no values)."""
    if not values_s:
        return dict.fromkeys(("mean", "median", "std", "p90", "p95", "p99", "max"))
    return {
        "mean": _ms(statistics.fmean(values_s)),
        "median": _ms(percentile(values_s, 50)),
        "std": _ms(statistics.pstdev(values_s)),
        "p90": _ms(percentile(values_s, 90)),
        "p95": _ms(percentile(values_s, 95)),
        "p99": _ms(percentile(values_s, 99)),
        "max": _ms(max(values_s)),
    }


def error_key(outcome: Outcome) -> str:
    """Where a failed request is counted in ``errors_by_status``."""
    return NO_RESPONSE if outcome.status is None else str(outcome.status)


def timeline(outcomes: Sequence[Outcome], duration_s: float) -> list[TimelineBucket]:
    """Per-second buckets from 0 to the run's end, of the requests ``num_requests`` counts
    (messages, and session opens that failed): a request counts as started in the second of
    its first attempt and as completed or failed in the second it ended; ``in_flight`` is how
    many were running at the bucket's end."""
    outcomes = [o for o in outcomes if o.op == "message" or not o.ok]
    seconds = max(1, math.ceil(duration_s))
    if outcomes:
        seconds = max(seconds, math.floor(max(o.end_s for o in outcomes)) + 1)
    started = [0] * seconds
    completed = [0] * seconds
    failed = [0] * seconds
    retried = [0] * seconds
    tokens = [0] * seconds
    latencies: list[list[float]] = [[] for _ in range(seconds)]

    def bucket(t: float) -> int:
        return min(seconds - 1, max(0, math.floor(t)))

    for o in outcomes:
        started[bucket(o.start_s)] += 1
        end = bucket(o.end_s)
        for at, _ in o.retries:
            retried[bucket(at)] += 1
        if o.ok:
            completed[end] += 1
            tokens[end] += o.output_tokens
            latencies[end].append(o.e2e_s)
        else:
            failed[end] += 1
    buckets = []
    in_flight = 0
    for s in range(seconds):
        in_flight += started[s] - completed[s] - failed[s]
        buckets.append(
            TimelineBucket(
                second=s,
                started=started[s],
                completed=completed[s],
                failed=failed[s],
                retries=retried[s],
                in_flight=in_flight,
                output_tokens=tokens[s],
                median_e2el_ms=_ms(percentile(latencies[s], 50)),
                p95_e2el_ms=_ms(percentile(latencies[s], 95)),
            )
        )
    return buckets


def failed_criteria(
    thresholds: Thresholds,
    p95_s: float | None,
    p99_s: float | None,
    success_rate: float,
    throughput_rps: float,
) -> list[str]:
    """Each criterion the run missed, worded for a person, naming the flag that set it."""
    failures = []
    for name, flag, value, limit in (
        ("p95", "--p95-max", p95_s, thresholds.p95_max_s),
        ("p99", "--p99-max", p99_s, thresholds.p99_max_s),
    ):
        if value is None:
            failures.append(f"{name} latency: no completed messages to measure ({flag} {limit:g})")
        elif value > limit:
            failures.append(f"{name} latency {value:.3f} s > {flag} {limit:g} s")
    if success_rate < thresholds.success_min:
        failures.append(
            f"success rate {success_rate:.4f} < --success-min {thresholds.success_min:g}"
        )
    if thresholds.rps_min is not None and throughput_rps < thresholds.rps_min:
        failures.append(
            f"throughput {throughput_rps:.2f} req/s < --rps-min {thresholds.rps_min:g} req/s"
        )
    return failures


def build_report(
    outcomes: Sequence[Outcome],
    *,
    config: RunConfig,
    api_url: str,
    date: str,
    duration_s: float,
    thresholds: Thresholds,
    client: ClientStats,
    run_failures: Sequence[str] = (),
    started_at: float = 0.0,
) -> LoadTestReport:
    """Aggregate a run's outcomes into its report, judged against ``thresholds``; each of
    ``run_failures`` (a load generator that failed) fails it as well."""
    duration_s = max(duration_s, 1e-9)
    messages = [o for o in outcomes if o.op == "message"]
    done = [o for o in messages if o.ok]
    failures = [o for o in outcomes if not o.ok]
    num_requests = len(done) + len(failures)
    success_rate = len(done) / num_requests if num_requests else 0.0
    e2el = [o.e2e_s for o in done]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    e2el_ms = _stats_ms(e2el)
    ttft_ms = _stats_ms(ttft)
    tokens_in = sum(o.input_tokens for o in done)
    tokens_out = sum(o.output_tokens for o in done)
    retries = Counter(reason for o in outcomes for _, reason in o.retries)
    throughput = len(done) / duration_s
    p95_s = percentile(e2el, 95)
    p99_s = percentile(e2el, 99)
    missed = [*run_failures, *failed_criteria(thresholds, p95_s, p99_s, success_rate, throughput)]
    return LoadTestReport(
        schema_version=SCHEMA_VERSION,
        tool="hyperfleet loadtest",
        date=date,
        started_at=round(started_at, 3),
        api_url=api_url,
        config=config,
        duration=round(duration_s, 6),
        num_requests=num_requests,
        completed=len(done),
        failed=len(failures),
        success_rate=round(success_rate, 6),
        sessions_opened=sum(1 for o in outcomes if o.op == "open_session" and o.ok),
        tool_calls=sum(1 for o in done if o.tool_call),
        max_concurrency=config.users if config.mode == "closed" else None,
        request_rate=config.rate,
        request_throughput=round(throughput, 6),
        output_throughput=round(tokens_out / duration_s, 6),
        total_token_throughput=round((tokens_in + tokens_out) / duration_s, 6),
        total_input_tokens=tokens_in,
        total_output_tokens=tokens_out,
        total_cache_read_input_tokens=sum(o.cache_read_input_tokens for o in done),
        total_cost_usd=round(sum(o.cost_usd for o in done), 8),
        mean_ttft_ms=ttft_ms["mean"],
        median_ttft_ms=ttft_ms["median"],
        std_ttft_ms=ttft_ms["std"],
        p90_ttft_ms=ttft_ms["p90"],
        p95_ttft_ms=ttft_ms["p95"],
        p99_ttft_ms=ttft_ms["p99"],
        max_ttft_ms=ttft_ms["max"],
        mean_e2el_ms=e2el_ms["mean"],
        median_e2el_ms=e2el_ms["median"],
        std_e2el_ms=e2el_ms["std"],
        p90_e2el_ms=e2el_ms["p90"],
        p95_e2el_ms=e2el_ms["p95"],
        p99_e2el_ms=e2el_ms["p99"],
        max_e2el_ms=e2el_ms["max"],
        errors_by_status=dict(sorted(Counter(error_key(o) for o in failures).items())),
        errors_by_type=dict(sorted(Counter(o.error_type or "unknown" for o in failures).items())),
        retries=Retries(total=sum(retries.values()), by_reason=dict(sorted(retries.items()))),
        timeline=timeline(outcomes, duration_s),
        thresholds=ThresholdsOut(
            p95_max_s=thresholds.p95_max_s,
            p99_max_s=thresholds.p99_max_s,
            success_min=thresholds.success_min,
            rps_min=thresholds.rps_min,
        ),
        passed=not missed,
        failed_criteria=missed,
        client=client,
    )


def _seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000.0:.3f}"


def summary(report: LoadTestReport) -> str:
    """The report as a few lines for a terminal."""
    c = report.config
    shape = (
        f"open loop, {c.rate:g} sessions/s"
        if c.mode == "open" and c.rate is not None
        else f"closed loop, {c.users} users"
    )
    lines = [
        f"hyperfleet loadtest: {shape} x {c.requests} requests, "
        f"stream {'on' if c.stream else 'off'}, tools mix {c.tools_mix:g}, "
        f"{report.duration:.1f} s",
        f"requests    {report.completed} completed, {report.failed} failed "
        f"(success {report.success_rate * 100:.2f} %), {report.retries.total} retries, "
        f"{report.sessions_opened} sessions, {report.tool_calls} with a tool call",
        f"throughput  {report.request_throughput:.2f} req/s, "
        f"{report.output_throughput:.1f} output tokens/s",
    ]
    for name, prefix in (("latency", "e2el"), ("ttft", "ttft")):
        values = report.model_dump()
        if values[f"median_{prefix}_ms"] is None:
            continue
        cells = "  ".join(
            f"{label} {_seconds(values[f'{key}_{prefix}_ms'])}"
            for label, key in (
                ("p50", "median"),
                ("p90", "p90"),
                ("p95", "p95"),
                ("p99", "p99"),
                ("max", "max"),
            )
        )
        lines.append(f"{name:<11} {cells} s")
    lines.append(
        f"tokens      {report.total_input_tokens} in ({report.total_cache_read_input_tokens} "
        f"cache reads), {report.total_output_tokens} out, ${report.total_cost_usd:.4f}"
    )
    if report.errors_by_status:
        by_status = ", ".join(f"{k}: {v}" for k, v in report.errors_by_status.items())
        by_type = ", ".join(f"{k}: {v}" for k, v in report.errors_by_type.items())
        lines.append(f"errors      {by_status} ({by_type})")
    if report.retries.total:
        lines.append(
            "retries     " + ", ".join(f"{k}: {v}" for k, v in report.retries.by_reason.items())
        )
    cl = report.client
    processes = "" if cl.processes == 1 else f"{cl.processes} processes, the busiest at "
    lines.append(
        f"client      {processes}{cl.cpu_percent:.0f} % of a core, {cl.cpu_s:.2f} CPU s, "
        f"event-loop lag p99 {cl.loop_lag_p99_ms:.1f} ms (max {cl.loop_lag_max_ms:.1f} ms)"
    )
    lines.extend(f"warning: {w}" for w in cl.warnings)
    if report.passed:
        lines.append("PASS")
    else:
        lines.append("FAIL")
        lines.extend(f"  failed: {criterion}" for criterion in report.failed_criteria)
    return "\n".join(lines)
