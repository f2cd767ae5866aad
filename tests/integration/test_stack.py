"""``hyperfleet up`` / ``agents`` / ``chat`` / ``status`` / ``down`` as a user runs them, with real
processes, and the README's curl conversation run as written."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.observability.dashboard import panel_queries
from cluster.observability.prometheus import ALERT_RULES
from hyperfleet.processes import free_port

from .prometheus_server import Prometheus

README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT_S = 180
# Prometheus scrapes every 5 s; its first scrape of a new target comes within one interval.
SCRAPED_WITHIN_S = 30.0
POLL_S = 0.5


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "RAY_AUTH"))}
    env["HYPERFLEET_HOME"] = str(home)
    if api_url:
        env["HYPERFLEET_URL"] = api_url
    return env


def _hyperfleet(
    home: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        env=_env(home),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _wider_than_private(home: Path) -> dict[str, str]:
    """Each file under ``home`` that is not 0600 and each folder that is not 0700, with its mode
    (the stack's state, keys, logs, pid files, databases with their WAL, Redis's files); the
    HAProxy wrapper is 0700, its owner's alone too."""
    wide = {}
    for path in [home, *home.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (0o700 if path.is_dir() or path == home / "bin" / "haproxy" else 0o600):
            wide[str(path.relative_to(home))] = oct(mode)
    return wide


def _stack_flags(ports: list[str]) -> list[str]:
    """Every port of a stack, each free: stacks of other tests and people run beside it."""
    flags = ["--port", ports[0], "--emulator-port", ports[1], "--ray-port", ports[2]]
    flags += ["--redis-port", ports[3], "--dashboard-port", ports[4]]
    return [*flags, "--prometheus-port", ports[5]]


def _eventually(check: Callable[[], object], timeout_s: float = SCRAPED_WITHIN_S) -> object:
    """``check()``'s first truthy answer, asked again every ``POLL_S`` up to ``timeout_s``;
    the last answer if none was."""
    deadline = time.monotonic() + timeout_s
    while not (answer := check()) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return answer


def _rule_files(tmp_path: Path) -> tuple[list[str], set[str]]:
    """``up``'s flags for the rule files, and the rule groups Prometheus must load from them:
    Hyperfleet's own alerts.yml where it exists (``up``'s default), else a placeholder."""
    rules, flags = ALERT_RULES, []
    if not rules.exists():
        rules = tmp_path / "placeholder-rules.yml"
        rules.write_text(
            "groups:\n- name: placeholder\n  rules:\n"
            "  - alert: RayNodeMetricsAbsent\n    expr: absent(ray_node_mem_used)\n"
        )
        flags = ["--prometheus-rules", str(rules)]
    return flags, {g["name"] for g in yaml.safe_load(rules.read_text())["groups"]}


def _series(prometheus: str, selector: str) -> set[str]:
    """The names of the series ``selector`` matches now."""
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": selector}, timeout=10)
    return {r["metric"]["__name__"] for r in answer.json()["data"]["result"]}


def _check_dashboard(home: Path, dashboard: str, agent_id: str) -> None:
    """The Ray dashboard wants the stack's Ray token, and with it lists the agent's replica by
    the name a batch job looks it up by, and finds the stack's Prometheus."""
    actors = f"{dashboard}/api/v0/actors"
    assert httpx.get(actors, timeout=30).status_code == 401
    token = (home / "ray_auth_token").read_text().strip()
    listed = httpx.get(
        actors,
        params={"limit": 1000},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert listed.status_code == 200, listed.text
    actors_listed = listed.json()["data"]["result"]["result"]
    names = {(a.get("name"), a.get("ray_namespace"), a["state"]) for a in actors_listed}
    assert (f"agent-{agent_id}-0", "hyperfleet", "ALIVE") in names
    # Its Metrics view asks the stack's Prometheus (RAY_PROMETHEUS_HOST in the head's env).
    health = httpx.get(
        f"{dashboard}/api/prometheus_health",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert health.json()["result"] is True, health.text


def _check_prometheus(prometheus: str, rule_groups: set[str]) -> None:
    """Prometheus scrapes the head's metrics agents (found through the head's own discovery
    file), loads the rule files, and keeps Hyperfleet's metrics under their catalogue names."""

    def ray_targets_up() -> list[dict[str, object]]:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]
        ray = [t for t in targets["activeTargets"] if t["labels"]["job"] == "ray"]
        return ray if ray and all(t["health"] == "up" for t in ray) else []

    assert _eventually(ray_targets_up), httpx.get(f"{prometheus}/api/v1/targets").text
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in groups} == rule_groups
    assert _eventually(lambda: _series(prometheus, "ray_node_mem_used"))  # Ray's own, as is
    # The turns of the chat and the curl conversation, renamed from ray_hyperfleet_*.
    assert _eventually(lambda: _series(prometheus, "hyperfleet_turns_total"))
    assert _series(prometheus, '{__name__=~"ray_hyperfleet_.+"}') == set()


# Panels of processes a one-machine stack does not run (the node provider, the join service, node
# agents): their queries run against a real Prometheus in test_provider.py and
# test_node_agent.py, beside the processes that feed them.
OUTSIDE_THE_STACK = (
    "hyperfleet_hypercore_",
    "hyperfleet_vms",
    "hyperfleet_node_",
    "hyperfleet_join_",
)
# Pool events this stack's run does not cause: its agents keep their one replica (a few sessions),
# so no pool scales up or drains, and a histogram with no observation in the window has no
# quantile. The other pool queries have data here: the gauge and the decisions from every tick,
# the counts of starts, capped replicas and moved sessions through `or vector(0)`.
NO_POOL_EVENTS = ("hyperfleet_pool_replica_start_seconds", "hyperfleet_pool_drain_seconds")
PANELS_WAIT_S = 90.0  # Ray's metrics report (5 s), the scrape (5 s), two samples for rate()


def _check_panels(prometheus: str, api_url: str, home: Path, agent_id: str) -> None:
    """Every query of every Hyperfleet dashboard panel that this stack feeds gives a number
    (not "No data", not NaN) from the stack's Prometheus. A rate needs two samples that differ,
    so a second round of traffic (a turn, a streamed tool turn, a spawn, a refusal) comes after
    the first scrape of the first round's series."""
    assert _eventually(lambda: _series(prometheus, "hyperfleet_replica_start_seconds_count"))
    key = (home / "admin.key").read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=TIMEOUT_S) as api:
        second = api.post("/v1/agents", json={"tools": ["bash"]})
        assert second.status_code == 201, second.text
        sid = api.post(f"/v1/agents/{agent_id}/sessions").json()["id"]
        assert api.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"}).is_success
        tool = {"content": '[[tool bash {"command": "echo again"}]]', "stream": True}
        assert api.post(f"/v1/sessions/{sid}/messages", json=tool).is_success
        assert api.get("/v1/agents", headers={"Authorization": "Bearer hf_x_y"}).status_code == 401
        api.delete(f"/v1/agents/{second.json()['id']}")
    skipped = (*OUTSIDE_THE_STACK, *NO_POOL_EVENTS)
    queries = [(t, q) for t, q in panel_queries() if not any(m in q for m in skipped)]
    assert len(queries) >= 40
    server = Prometheus(prometheus, [], home / "logs" / "prometheus.log")
    try:
        server.require_panel_data(queries, PANELS_WAIT_S)
    finally:
        server.close()


def _check_grafana_folder(home: Path, prometheus: str) -> None:
    folder = home / "grafana"
    sources = yaml.safe_load((folder / "provisioning/datasources/hyperfleet.yml").read_text())
    assert [s["url"] for s in sources["datasources"]] == [prometheus]
    assert (folder / "provisioning/dashboards/hyperfleet.yml").is_file()
    ray_dashboards = {p.name for p in (folder / "dashboards/ray").iterdir()}
    assert {"default_grafana_dashboard.json", "serve_grafana_dashboard.json"} <= ray_dashboards
    assert json.loads((folder / "dashboards/hyperfleet/hyperfleet.json").read_text())["panels"]


def _curl_block() -> str:
    match = re.search(
        r"<!-- curl-conversation -->\s*```sh\n(.*?)```", README.read_text(), re.DOTALL
    )
    assert match, "README lost its curl conversation"
    return match.group(1)


@pytest.mark.timeout(400)
def test_up_chat_curl_status_down(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = [str(free_port()) for _ in range(6)]
    rule_flags, rule_groups = _rule_files(tmp_path)
    flags = [*_stack_flags(ports), *rule_flags]
    up = _hyperfleet(home, "up", *flags)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api_url = f"http://127.0.0.1:{ports[0]}"
        dashboard, prometheus = f"http://127.0.0.1:{ports[4]}", f"http://127.0.0.1:{ports[5]}"
        assert f"Hyperfleet API: {api_url}" in up.stdout
        assert f"Ray dashboard:  {dashboard}" in up.stdout
        assert f"Prometheus:     {prometheus}" in up.stdout
        assert "note:" not in up.stdout  # Ray's dashboards and Hyperfleet's were provisioned
        key_file = home / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_text().strip() in up.stdout
        assert f"redis-server on 127.0.0.1:{ports[3]}" in up.stdout  # installed here
        assert "warning:" not in up.stdout  # every prerequisite is installed here
        again = _hyperfleet(home, "up", *flags)
        assert again.returncode == 0, again.stderr
        assert key_file.read_text().strip() in again.stdout  # the same admin, not a new one

        created = _hyperfleet(home, "agents", "create", "--tool", "bash")
        assert created.returncode == 0, created.stderr
        agent_id = json.loads(created.stdout)["id"]
        assert agent_id in _hyperfleet(home, "agents", "list").stdout
        chat = _hyperfleet(
            home, "chat", agent_id, stdin='Hello there\n[[tool bash {"command": "echo chat-ok"}]]\n'
        )
        assert chat.returncode == 0, chat.stderr
        assert "agent> You said: Hello there." in chat.stdout
        assert "[tool bash" in chat.stdout and "[result] chat-ok" in chat.stdout
        assert "(end_turn;" in chat.stdout

        curl = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _curl_block()],
            env=_env(home, api_url),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert curl.returncode == 0, curl.stderr
        assert "You said: Hello!" in curl.stdout
        assert "event: tool_result" in curl.stdout and "hello from the sandbox" in curl.stdout
        assert '"version":2' in curl.stdout.replace(" ", "")
        assert '"turns"' in curl.stdout and '"cost_usd"' in curl.stdout

        _check_dashboard(home, dashboard, agent_id)
        _check_prometheus(prometheus, rule_groups)
        _check_panels(prometheus, api_url, home, agent_id)
        _check_grafana_folder(home, prometheus)

        status = json.loads(_hyperfleet(home, "status").stdout)
        assert status["api"]["healthy"] is True
        assert status["dashboard"] == {
            "url": dashboard,
            "healthy": True,
            "token_file": str(home / "ray_auth_token"),
        }
        assert status["prometheus"]["url"] == prometheus and status["prometheus"]["healthy"]
        assert status["grafana"]["provisioning"] == str(home / "grafana" / "provisioning")
        # While everything runs and has written: SQLite's WAL files, Redis's append-only files.
        assert {"control.db-wal", "sessions.db"} <= {p.name for p in (home / "data").iterdir()}
        assert any((home / "data" / "redis").rglob("*.aof"))
        assert _wider_than_private(home) == {}
        assert status["ray-head"]["running"] and status["emulator"]["running"]
        assert status["redis"]["running"] and status["prometheus"]["running"]
        deleted = _hyperfleet(home, "agents", "delete", agent_id)
        assert json.loads(deleted.stdout)["status"] == "deleted"
    finally:
        down = _hyperfleet(home, "down")
    assert down.returncode == 0 and "stopped the Ray head" in down.stdout
    after = json.loads(_hyperfleet(home, "status").stdout)
    assert not after["ray-head"]["running"] and not after["emulator"]["running"]
    assert not after["redis"]["running"] and not after["prometheus"]["running"]


def test_cli_client_errors_are_clear(tmp_path: Path) -> None:
    missing = _hyperfleet(tmp_path, "agents", "list")
    assert missing.returncode == 1 and "no API key" in missing.stderr
    (tmp_path / "admin.key").write_text("hf_x_y")
    env_url = _env(tmp_path, f"http://127.0.0.1:{free_port()}")
    unreachable = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "agents", "list"],
        env=env_url,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def _statuses(url: str, source: str, n: int, spoof: bool = False) -> list[int]:
    """``n`` keyless requests from ``source``; with ``spoof``, each claims another address in
    every header a client could think of."""
    transport = httpx.HTTPTransport(local_address=source)
    statuses = []
    with httpx.Client(transport=transport, timeout=30) as client:
        for i in range(n):
            claimed = f"198.51.100.{i + 1}"
            headers = {
                "X-Forwarded-For": claimed,
                "Forwarded": f"for={claimed}",
                "X-Hyperfleet-Peer": claimed,
                "X-Hyperfleet-Proxy-Token": "guess",
            }
            statuses.append(client.get(url, headers=headers if spoof else None).status_code)
    return statuses


@pytest.mark.timeout(300)
def test_up_limits_each_client_address_behind_haproxy(tmp_path: Path) -> None:
    """Each loopback source address is a client of its own behind Serve's HAProxy (the default
    ingress); no header moves a request to another window; an exempt address has none."""
    home = tmp_path / "home"
    ports = [str(free_port()) for _ in range(6)]
    flags = [*_stack_flags(ports), "--ip-requests-per-minute", "5"]
    flags += ["--ip-exempt", "127.0.0.4/32, 2001:db8::/32"]
    up = _hyperfleet(home, "up", *flags)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{ports[0]}/v1/usage"
        assert _statuses(url, "127.0.0.2", 6) == [401] * 5 + [429]
        assert _statuses(url, "127.0.0.3", 6, spoof=True) == [401] * 5 + [429]
        assert _statuses(url, "127.0.0.2", 1, spoof=True) == [429]
        assert _statuses(url, "127.0.0.4", 8, spoof=True) == [401] * 8
    finally:
        down = _hyperfleet(home, "down")
    assert down.returncode == 0, down.stderr


def test_up_refuses_a_bad_cidr_before_starting_anything(tmp_path: Path) -> None:
    bad = _hyperfleet(tmp_path, "up", "--trusted-proxies", "10.0.0.0/8,10.0.0.1/8")
    assert bad.returncode == 2
    assert "--trusted-proxies: '10.0.0.1/8' is not a CIDR" in bad.stderr
    assert not (tmp_path / "stack.json").exists()
