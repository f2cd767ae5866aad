"""The load tester's pure parts: percentiles, the timeline, thresholds, the JSON layout and its
documentation, SSE parsing, the retry policy and the test's sizing."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

import cluster.loadtest as loadtest
from cluster.cli.commands import build_parser, main
from cluster.loadtest.report import (
    ClientStats,
    LoadTestReport,
    Outcome,
    Thresholds,
    build_report,
    failed_criteria,
    percentile,
    summary,
    timeline,
)
from cluster.loadtest.run import run_config
from cluster.loadtest.sse import SseError, SseParser
from cluster.loadtest.tenant import agent_spec, raised_quotas
from cluster.loadtest.users import Attempt, Plan, message_text, retry_delay_s

DOCS = Path(__file__).resolve().parents[2] / "docs" / "loadtest.md"
CLIENT = ClientStats(
    processes=1,
    cpu_s=0.5,
    cpu_percent=10.0,
    loop_lag_p99_ms=1.0,
    loop_lag_max_ms=2.0,
    dropped_arrivals=0,
    warnings=[],
)


def _message(start: float, end: float, **kwargs: object) -> Outcome:
    fields: dict[str, object] = {"ok": True, "status": 200, "output_tokens": 10}
    fields.update(kwargs)
    return Outcome("message", start, end, **fields)  # type: ignore[arg-type]


def _report(outcomes: list[Outcome], thresholds: Thresholds | None = None) -> LoadTestReport:
    return build_report(
        outcomes,
        config=run_config(Plan(users=2, requests=3, stream=True)),
        api_url="http://127.0.0.1:8000",
        date="2025-01-01T00:00:00Z",
        duration_s=max((o.end_s for o in outcomes), default=1.0),
        thresholds=thresholds or Thresholds(),
        client=CLIENT,
    )


def test_percentiles_interpolate_between_ranks_as_numpy_does() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([float(i) for i in range(1, 101)], 95) == pytest.approx(95.05)


def test_timeline_buckets_by_second_with_in_flight_and_retries() -> None:
    outcomes = [
        _message(0.1, 0.6),
        _message(0.5, 2.2, retries=((1.4, "429"),)),
        _message(1.0, 1.9, ok=False, status=502, error_type="upstream_error"),
    ]
    buckets = timeline(outcomes, 2.2)
    assert [b.second for b in buckets] == [0, 1, 2]
    assert [(b.started, b.completed, b.failed) for b in buckets] == [
        (2, 1, 0),
        (1, 0, 1),
        (0, 1, 0),
    ]
    assert [b.in_flight for b in buckets] == [1, 1, 0]
    assert [b.retries for b in buckets] == [0, 1, 0]
    assert buckets[0].median_e2el_ms == 500.0 and buckets[1].median_e2el_ms is None
    assert buckets[2].output_tokens == 10
    opened = Outcome("open_session", 0.0, 0.1, ok=True, status=201)
    assert timeline([opened, *outcomes], 2.2) == buckets  # as num_requests counts


def test_thresholds_name_each_failed_criterion_and_its_flag() -> None:
    thresholds = Thresholds(p95_max_s=1.0, p99_max_s=2.0, success_min=0.99, rps_min=10.0)
    assert failed_criteria(thresholds, 0.5, 1.5, 1.0, 20.0) == []
    missed = failed_criteria(thresholds, 1.5, 2.5, 0.9, 5.0)
    assert len(missed) == 4
    assert missed[0] == "p95 latency 1.500 s > --p95-max 1 s"
    assert "--p99-max" in missed[1] and "--success-min" in missed[2] and "--rps-min" in missed[3]
    nothing = failed_criteria(Thresholds(), None, None, 0.0, 0.0)
    assert any("no completed messages" in c for c in nothing)


def test_report_counts_failed_opens_retries_and_errors() -> None:
    outcomes = [
        Outcome("open_session", 0.0, 0.1, ok=True, status=201),
        _message(0.1, 0.3, ttft_s=0.05, input_tokens=100, retries=((0.2, "503"),)),
        _message(0.3, 0.7, ttft_s=0.07, input_tokens=120, tool_call=True),
        _message(0.7, 0.8, ok=False, status=None, error_type="connection", output_tokens=0),
        Outcome("open_session", 0.0, 0.5, ok=False, status=429, error_type="rate_limited"),
    ]
    report = _report(outcomes)
    assert (report.completed, report.failed, report.num_requests) == (2, 2, 4)
    assert report.success_rate == 0.5 and report.sessions_opened == 1 and report.tool_calls == 1
    assert report.errors_by_status == {"429": 1, "no_response": 1}
    assert report.errors_by_type == {"connection": 1, "rate_limited": 1}
    assert report.retries.total == 1 and report.retries.by_reason == {"503": 1}
    assert report.total_input_tokens == 220 and report.total_output_tokens == 20
    assert report.median_e2el_ms == pytest.approx(300.0) and report.max_ttft_ms == 70.0
    assert report.request_throughput == pytest.approx(2 / 0.8)
    assert not report.passed and any("--success-min" in c for c in report.failed_criteria)
    assert "FAIL" in summary(report) and "failed: success rate" in summary(report)


def test_report_passes_and_round_trips_through_its_json_layout() -> None:
    outcomes = [_message(i * 0.1, i * 0.1 + 0.2, ttft_s=0.01) for i in range(20)]
    report = _report(outcomes)
    assert report.passed and report.failed_criteria == [] and report.schema_version == 1
    text = report.model_dump_json(indent=2)
    again = LoadTestReport.model_validate_json(text)
    assert again == report
    data = json.loads(text)
    # vLLM's `bench serve` names, where the quantity is the same.
    for key in ("completed", "duration", "request_throughput", "total_output_tokens"):
        assert key in data
    for stat in ("mean", "median", "std", "p99"):
        assert f"{stat}_ttft_ms" in data and f"{stat}_e2el_ms" in data
    data["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        LoadTestReport.model_validate(data)


def test_every_field_of_the_layout_is_documented() -> None:
    documented = set(re.findall(r"`([a-z0-9_]+)`", DOCS.read_text()))
    models = [LoadTestReport, *(LoadTestReport.model_fields[f].annotation for f in ("config",))]
    nested = ("retries", "timeline", "thresholds", "client")
    names = set(LoadTestReport.model_fields)
    for model in models:
        names |= set(model.model_fields)  # type: ignore[union-attr]
    schema = LoadTestReport.model_json_schema()
    for name in nested:
        ref = schema["properties"][name].get("$ref") or schema["properties"][name]["items"]["$ref"]
        names |= set(schema["$defs"][ref.rsplit("/", 1)[1]]["properties"])
    assert names - documented == set()


def test_sse_parser_reassembles_events_split_across_chunks() -> None:
    stream = (
        b'event: turn_start\nid: 1\ndata: {"turn_id": "t"}\n\n'
        b": a comment\r\n\r\n"
        b'event: text_delta\nid: 2\ndata: {"text": "hi"}\n\n'
        b'event: turn_end\nid: 3\ndata: {"usage": {"output_tokens": 3}}\n\n'
    )
    parser = SseParser()
    events = []
    for i in range(0, len(stream), 7):
        events.extend(parser.feed(stream[i : i + 7]))
    assert [e.type for e in events] == ["turn_start", "text_delta", "turn_end"]
    assert [e.id for e in events] == ["1", "2", "3"]
    assert events[2].data == {"usage": {"output_tokens": 3}}
    with pytest.raises(SseError):
        SseParser().feed(b"event: error\ndata: not json\n\n")


def test_retries_follow_a_good_clients_rules() -> None:
    rng = random.Random(0)
    assert retry_delay_s(Attempt(429, "rate_limited", 2.0), 0, rng) == 2.0
    assert retry_delay_s(Attempt(503, "unavailable", 3600.0), 0, rng) == 30.0
    assert retry_delay_s(Attempt(409, "session_busy"), 0, rng) is not None
    assert retry_delay_s(Attempt(None, "connection"), 0, rng) is not None
    # The server's word decides: a 502 it calls retryable is resent (the key keeps it from
    # running twice), a 503 it does not is not.
    assert retry_delay_s(Attempt(502, "upstream_error", should_retry=True), 0, rng) is not None
    for refused in (
        Attempt(409, "idempotency_conflict"),
        Attempt(502, "upstream_error"),
        Attempt(None, "timeout"),
        Attempt(503, "unavailable", 1.0, should_retry=False),
        Attempt(502, "upstream_error", should_retry=False),
    ):
        assert retry_delay_s(refused, 0, rng) is None
    backoffs = [retry_delay_s(Attempt(503, "unavailable"), n, rng) for n in range(10)]
    assert all(b is not None and 0 <= b <= 8.0 for b in backoffs)


def test_tool_mix_messages_carry_the_emulators_directive() -> None:
    text, tool = message_text(random.Random(1), 1.0, 3)
    directive = re.search(r"\[\[tool write_file (.*)\]\]", text)
    assert tool and directive and json.loads(directive.group(1))["path"] == "loadtest-3.txt"
    assert message_text(random.Random(1), 0.0, 3)[1] is False


def test_the_agent_and_quotas_are_sized_for_the_load() -> None:
    small = agent_spec(Plan(users=5, requests=2), "sk-ant-x", "run")
    assert small["replicas"] == {"min": 1, "max": 1} and small["isolation"] == "shared"
    assert small["tools"] == [] and small["anthropic_api_key"] == "sk-ant-x"
    big = agent_spec(Plan(users=1000, requests=2, tools_mix=0.5), None, "run")
    assert big["replicas"]["max"] == 13 and big["tools"] == ["write_file"]
    assert "anthropic_api_key" not in big
    quotas = raised_quotas(Plan(users=1000, requests=2))
    assert quotas["max_sessions"] >= 1000 and quotas["max_replicas"] >= 13
    assert quotas["max_cores"] >= 13 * 0.5
    spread = agent_spec(Plan(users=5, requests=2), None, "run", min_replicas=3)
    assert spread["replicas"] == {"min": 3, "max": 3}
    quotas = raised_quotas(Plan(users=5, requests=2), min_replicas=3)
    assert quotas["max_replicas"] >= 3 and quotas["max_cores"] >= 3 * 0.5


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"users": 0}, "--users"),
        ({"requests": 0}, "--requests"),
        ({"tools_mix": 1.5}, "--tools-mix"),
        ({"rate": 0.0}, "--rate"),
        ({"duration_s": -1.0}, "--duration"),
        ({"think_time_s": -1.0}, "--think-time"),
    ],
)
def test_a_plan_out_of_range_names_its_flag(kwargs: dict[str, float], flag: str) -> None:
    args: dict[str, float] = {"users": 1, "requests": 1, **kwargs}
    with pytest.raises(ValueError, match=flag):
        Plan(**args)  # type: ignore[arg-type]


def test_the_seeds_flags_and_the_new_ones_parse(capsys: pytest.CaptureFixture[str]) -> None:
    seed = ["--api-url", "http://127.0.0.1:8000", "--anthropic-key", "sk-ant-x"]
    args = build_parser().parse_args(["loadtest", *seed, "--users", "5", "--requests", "2"])
    assert (args.users, args.requests, args.anthropic_key) == (5, 2, "sk-ant-x")
    assert (args.p95_max, args.p99_max, args.success_min, args.rps_min) == (3.0, 10.0, 0.99, None)
    with pytest.raises(SystemExit) as info:
        main(["loadtest", "--help"])
    assert info.value.code == 0 and "--tools-mix" in capsys.readouterr().out


def test_an_unreachable_api_is_a_message_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["loadtest", "--api-url", "http://127.0.0.1:1", "--api-key", "k", "--quiet"])
    assert code == 2
    assert "cannot reach the API at http://127.0.0.1:1" in capsys.readouterr().err


def test_the_package_names_its_surface() -> None:
    assert sorted(set(loadtest.__all__)) == sorted(loadtest.__all__)
    for name in loadtest.__all__:
        assert hasattr(loadtest, name)
