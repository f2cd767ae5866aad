"""The alerting rules: promtool accepts them and their tests pass, each says what to do, and every
metric name a rule or a dashboard panel uses is one Prometheus will actually have.

promtool is Prometheus's own checker (Debian's `prometheus` package installs /usr/bin/promtool);
`tests/prometheus/alerts_test.yml` holds, per alert, a near miss that stays quiet and the condition
that fires it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.observability.dashboard import panel_queries

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "cluster" / "observability" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
CATALOGUE = ROOT / "docs" / "observability.md"
PROMTOOL_TIMEOUT_S = 60
SEVERITIES = {"critical", "warning", "info"}
# Prometheus's own per-target series, not any exporter's.
PROMETHEUS_METRICS = {"up"}

_ROW = re.compile(r"^\| `(hyperfleet_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}')
_LABEL_NAME = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_DURATION = re.compile(r"\[[^\]]*\]|\boffset\s+\w+")
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install -y prometheus` provides it")
    return path


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def recorded_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def catalogue() -> dict[str, tuple[str, set[str]]]:
    """docs/observability.md's metric table: name -> (type, labels)."""
    table: dict[str, tuple[str, set[str]]] = {}
    for line in CATALOGUE.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            name, kind, labels = match.groups()
            table[name] = (kind, set(re.findall(r"`([a-z_]+)`", labels)))
    return table


def ray_metric_sources() -> str:
    """The text of Ray's own Grafana panels and node reporter: where Ray's exported names live."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    modules = Path(spec.origin).parent / "dashboard" / "modules"
    files = [
        *sorted((modules / "metrics" / "dashboards").glob("*_panels.py")),
        modules / "reporter" / "reporter_agent.py",
    ]
    return "\n".join(path.read_text() for path in files)


def is_ray_metric(name: str, sources: str) -> bool:
    # A panel names it in full (ray_node_mem_used{...}); the reporter registers it bare
    # ("node_mem_used") and Ray's exporter adds the prefix.
    in_panels = re.search(re.escape(name) + r"(?![a-zA-Z0-9_])", sources) is not None
    registered = f'"{name.removeprefix("ray_")}"' in sources
    return name.startswith("ray_") and (in_panels or registered)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not its functions, labels or keywords)."""
    stripped = _MATCHERS.sub(lambda m: m.group(1), expr)
    stripped = _STRING.sub("", stripped)
    stripped = _GROUPING.sub("", stripped)
    stripped = _DURATION.sub("", stripped)
    return {name for name in _IDENT.findall(stripped) if name not in _KEYWORDS}


def matched_labels(expr: str) -> dict[str, set[str]]:
    """metric name -> the label names its `{...}` matchers use."""
    labels: dict[str, set[str]] = {}
    for name, body in _MATCHERS.findall(expr):
        labels.setdefault(name, set()).update(_LABEL_NAME.findall(_STRING.sub('""', body)))
    return labels


def all_expressions() -> list[tuple[str, str]]:
    rules = [(f"alert {rule['alert']}", str(rule["expr"])) for rule in alert_rules()]
    panels = [(f"panel {title!r}", expr) for title, expr in panel_queries()]
    return rules + panels


def test_promtool_accepts_the_rules() -> None:
    run_promtool("check", "rules", str(ALERTS))


def test_promtool_rule_tests_pass() -> None:
    run_promtool("test", "rules", str(ALERT_TESTS))


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    rules = alert_rules()
    assert len(rules) >= 10
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        name = rule["alert"]
        assert "for" in rule, f"{name} has no for:"
        labels = rule.get("labels")
        assert isinstance(labels, dict) and labels.get("severity") in SEVERITIES, name
        annotations = rule.get("annotations")
        assert isinstance(annotations, dict), name
        for key in ("summary", "runbook"):
            text = annotations.get(key)
            assert isinstance(text, str) and text.strip(), f"{name} has no {key}"
            assert "\n" not in text.strip(), f"{name}'s {key} is more than one line"


def test_every_alert_has_a_quiet_case_and_a_firing_case() -> None:
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    quiet: set[str] = set()
    fired: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alert_rules()}
    assert names - quiet == set(), "alerts with no case that stays quiet"
    assert names - fired == set(), "alerts with no case that fires"


def test_every_alert_is_in_the_docs() -> None:
    section = CATALOGUE.read_text().partition("## Alerts")[2]
    assert section, "docs/observability.md has no '## Alerts' section"
    missing = [rule["alert"] for rule in alert_rules() if f"`{rule['alert']}`" not in section]
    assert missing == []


def test_every_metric_name_is_catalogued_or_ray_or_prometheus() -> None:
    table = catalogue()
    assert len(table) >= 20, "the catalogue table in docs/observability.md did not parse"
    recorded = recorded_names()
    ray_sources = ray_metric_sources()
    unknown = []
    for where, expr in all_expressions():
        for name in metric_names(expr):
            base = _HISTOGRAM_SERIES.sub("", name)
            if base in table:
                histogram = table[base][0] == "histogram"
                assert histogram or name == base, f"{where}: {name} but {base} is no histogram"
            elif not (
                name in recorded or name in PROMETHEUS_METRICS or is_ray_metric(name, ray_sources)
            ):
                unknown.append(f"{where}: {name}")
    assert unknown == []


def test_label_matchers_use_catalogued_labels() -> None:
    table = catalogue()
    wrong = []
    for where, expr in all_expressions():
        for name, labels in matched_labels(expr).items():
            base = _HISTOGRAM_SERIES.sub("", name)
            if base in table:
                allowed = table[base][1] | ({"le"} if name.endswith("_bucket") else set())
                wrong += [f"{where}: {name}{{{label}}}" for label in labels - allowed]
    assert wrong == []


def test_the_dashboard_shows_every_catalogued_metric() -> None:
    shown = {
        _HISTOGRAM_SERIES.sub("", name)
        for _, expr in panel_queries()
        for name in metric_names(expr)
    }
    assert set(catalogue()) - shown == set()


def test_the_name_parser_finds_names_not_functions_or_labels() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (route, le) (rate(a_bucket{route="/x/{id}"}[5m])))'
        " / on() b offset 15m or vector(0) > bool c:recorded"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c:recorded"}
    assert matched_labels(expr) == {"a_bucket": {"route"}}
