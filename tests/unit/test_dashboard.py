"""The Grafana dashboard: valid JSON Grafana imports, stable from run to run, on a datasource
variable, and every panel's PromQL parsed by Prometheus's own parser (promtool, through a rule file
that records each expression).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.observability.dashboard import (
    DASHBOARD_TITLE,
    DASHBOARD_UID,
    dashboard_json,
    panel_queries,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
PROMTOOL_TIMEOUT_S = 60


def panels() -> list[dict[str, Any]]:
    return list(json.loads(dashboard_json())["panels"])


def graphs() -> list[dict[str, Any]]:
    return [panel for panel in panels() if panel["type"] != "row"]


def test_the_json_is_a_grafana_dashboard() -> None:
    board = json.loads(dashboard_json())
    assert board["title"] == DASHBOARD_TITLE == "Hyperfleet"
    # Grafana keys provisioning, links and Ray-style embedding by uid: it must never change.
    assert board["uid"] == DASHBOARD_UID == "hyperfleet-overview"
    assert board["rows"] == []
    assert len(graphs()) >= 12
    ids = [panel["id"] for panel in panels()]
    assert all(isinstance(panel_id, int) for panel_id in ids)
    assert len(set(ids)) == len(ids)


def test_the_json_is_the_same_every_time() -> None:
    assert dashboard_json() == dashboard_json()


def test_the_datasource_is_a_variable() -> None:
    variables = json.loads(dashboard_json())["templating"]["list"]
    (datasource,) = [v for v in variables if v["name"] == "datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for panel in graphs():
        assert panel["datasource"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == "${datasource}", panel["title"]


def test_every_target_has_an_expression() -> None:
    for panel in graphs():
        assert panel["title"] and panel["description"]
        targets = panel["targets"]
        assert targets, f"{panel['title']} has no target"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]


def test_panel_queries_are_the_dashboards_targets() -> None:
    in_json = [(p["title"], t["expr"]) for p in graphs() for t in p["targets"]]
    assert panel_queries() == in_json


def test_queries_run_in_prometheus_as_they_are() -> None:
    # The integration tier runs panel_queries() against Prometheus itself: a Grafana variable or
    # macro ($__rate_interval, $instance) would not parse there.
    uses_variables = [(title, expr) for title, expr in panel_queries() if "$" in expr]
    assert uses_variables == []


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `apt-get install -y prometheus` provides it")
    rules = [
        {"record": f"hyperfleet_dashboard:panel_{index}", "expr": expr}
        for index, (_, expr) in enumerate(panel_queries())
    ]
    rule_file = tmp_path / "panels.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


def test_every_panel_is_in_the_docs() -> None:
    section = DOCS.read_text().partition("## The dashboard")[2].partition("\n## ")[0]
    assert section, "docs/observability.md has no '## The dashboard' section"
    missing = [p["title"] for p in graphs() if f"**{p['title']}**" not in section]
    assert missing == []
