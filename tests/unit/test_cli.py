from __future__ import annotations

import json
import re
import socket
import stat
from pathlib import Path

import pytest
import yaml

from cluster.cli import monitoring, stack
from cluster.cli.commands import build_parser, main
from cluster.cli.servers import ray_head_argv
from cluster.cli.settings import Settings
from cluster.observability import grafana, prometheus

SUBCOMMANDS = ["emulator", "up", "down", "status"]


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: hyperfleet" in capsys.readouterr().out


def test_top_level_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    build_parser().print_help()
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


def test_bad_emulator_settings_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emulator", "--fault-429", "0.7", "--fault-500", "0.7"]) == 2
    assert "more than 1" in capsys.readouterr().err
    assert main(["emulator", "--tps", "-3"]) == 2
    assert "--tps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["emulator", "--port", "many"])
    assert info.value.code == 2


def test_a_bad_redis_url_is_explained_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HYPERFLEET_HOME", str(tmp_path))
    monkeypatch.setenv("HYPERFLEET_REDIS_URL", "localhost:6379")
    assert main(["up"]) == 2
    assert "HYPERFLEET_REDIS_URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


def test_up_without_redis_says_why_and_uses_the_sqlite_stores(tmp_path: Path) -> None:
    said: list[str] = []
    off = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path), "HYPERFLEET_REDIS": "off"})
    assert stack._redis(off, stack._daemons(off), 6390, said.append) is None
    assert "SQLite stores" in said[-1]
    given = Settings.from_env(
        {"HYPERFLEET_HOME": str(tmp_path), "HYPERFLEET_REDIS_URL": "redis://:pw@10.0.0.9:6379/0"}
    )
    url = stack._redis(given, stack._daemons(given), 6390, said.append)
    assert url == "redis://:pw@10.0.0.9:6379/0" and "pw" not in said[-1]
    assert not (tmp_path / "run").exists()  # no local redis-server was started


def test_up_says_which_prerequisites_are_missing_and_how_to_get_them(tmp_path: Path) -> None:
    from cluster.cli.prerequisites import missing_prerequisites

    settings = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path)})

    def bare(binary: str) -> str | None:  # a fresh Debian: none of them
        return None

    lines = missing_prerequisites(settings, bare, is_root=True)
    assert len(lines) == 4 and all(line.startswith("warning: ") for line in lines)
    redis, bwrap, prometheus, iptables = lines
    assert "redis-server not installed" in redis and "slower SQLite path" in redis
    assert redis.endswith("apt-get install -y redis-server")
    assert "bwrap not installed" in bwrap and "bash and other shell tools will fail" in bwrap
    assert bwrap.endswith("apt-get install -y bubblewrap")
    assert "prometheus not installed" in prometheus and "no metrics are kept" in prometheus
    assert prometheus.endswith("apt-get install -y prometheus")
    assert "iptables and ip6tables not installed" in iptables
    assert iptables.endswith("apt-get install -y iptables")

    def installed(binary: str) -> str | None:
        return f"/usr/bin/{binary}"

    assert missing_prerequisites(settings, installed, is_root=True) == []
    # Not root: tool egress needs root anyway. No local Redis wanted: no word of it.
    off = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path), "HYPERFLEET_REDIS": "off"})
    not_root = missing_prerequisites(off, bare, is_root=False)
    assert len(not_root) == 2
    assert "bubblewrap" in not_root[0] and "prometheus" in not_root[1]


def test_the_head_runs_its_dashboard_on_loopback_only_when_asked() -> None:
    stack_head = ray_head_argv(6385, 16, {}, dashboard_port=8265)
    assert "--include-dashboard=true" in stack_head
    assert {"--dashboard-host=127.0.0.1", "--dashboard-port=8265"} <= set(stack_head)
    assert "--include-dashboard=false" in ray_head_argv(6385, 2)  # the tests' own heads


def test_prometheus_scrapes_this_heads_nodes_with_hyperfleets_names(tmp_path: Path) -> None:
    session = tmp_path / "session_2026-12-02_08-00-00_000000_1"
    rules = tmp_path / "rules.yml"
    rules.write_text("groups: []\n")
    text = prometheus.config_text(
        prometheus.discovery_file(session), "127.0.0.1:9091", [rules, tmp_path / "absent.yml"]
    )
    config = yaml.safe_load(text)
    assert config["rule_files"] == [str(rules)]  # the missing file is not named
    ray_job, itself = config["scrape_configs"]
    assert ray_job["file_sd_configs"] == [
        {"files": [str(session / "prom_metrics_service_discovery.json")]}
    ]
    [rename] = ray_job["metric_relabel_configs"]
    assert re.fullmatch(rename["regex"], "ray_hyperfleet_turns_total")
    assert not re.fullmatch(rename["regex"], "ray_node_cpu_utilization")
    assert rename["replacement"] == "hyperfleet_$1" and rename["target_label"] == "__name__"
    assert itself["static_configs"] == [{"targets": ["127.0.0.1:9091"]}]
    assert config["global"]["scrape_interval"] == "5s"
    argv = prometheus.argv(
        "/usr/bin/prometheus", tmp_path / "p.yml", tmp_path / "d", "127.0.0.1:9091"
    )
    assert "--web.listen-address=127.0.0.1:9091" in argv
    assert "--web.enable-lifecycle" not in argv  # nothing on loopback can stop it over HTTP


def _ray_session_with_dashboards(tmp_path: Path) -> Path:
    """A Ray session folder as Ray's dashboard leaves it: its Grafana dashboards, then its
    Prometheus file last."""
    session = tmp_path / "session"
    ray_dashboards = session / "metrics" / "grafana" / "dashboards"
    ray_dashboards.mkdir(parents=True)
    (ray_dashboards / "default_grafana_dashboard.json").write_text('{"uid": "rayDefault"}')
    (session / "metrics" / "prometheus").mkdir()
    (session / "metrics" / "prometheus" / "prometheus.yml").write_text("")
    return session


def test_grafana_provisioning_is_private_and_points_at_the_stack(tmp_path: Path) -> None:
    folder = tmp_path / "home" / "grafana"
    done = grafana.provision(
        folder, "http://127.0.0.1:9091", 3001, _ray_session_with_dashboards(tmp_path), 5.0
    )
    assert done.notes == ()
    [source] = yaml.safe_load((done.provisioning / "datasources" / "hyperfleet.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://127.0.0.1:9091" and source["isDefault"] is True
    providers = yaml.safe_load((done.provisioning / "dashboards" / "hyperfleet.yml").read_text())
    paths = {p["folder"]: Path(p["options"]["path"]) for p in providers["providers"]}
    assert paths == {
        "Ray": folder / "dashboards/ray",
        "Hyperfleet": folder / "dashboards/hyperfleet",
    }
    assert done.ray_dashboards == ("default_grafana_dashboard.json",)
    assert json.loads((paths["Ray"] / "default_grafana_dashboard.json").read_text())["uid"]
    assert done.hyperfleet_dashboard is not None
    assert json.loads(done.hyperfleet_dashboard.read_text())["panels"]
    ini = done.config_file.read_text()
    assert "http_addr = 127.0.0.1" in ini and "http_port = 3001" in ini
    assert f"provisioning = {done.provisioning}" in ini
    for path in [folder, *folder.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_grafana_provisioning_says_what_it_could_not_provide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grafana, "DASHBOARD_MODULE", "cluster.observability.no_such_dashboard")
    done = grafana.provision(tmp_path / "grafana", "http://127.0.0.1:9091", 3000, tmp_path, 0.0)
    assert done.ray_dashboards == () and done.hyperfleet_dashboard is None
    ray_note, dashboard_note = done.notes
    assert "Ray's dashboard wrote no Grafana dashboards" in ray_note
    assert "no Hyperfleet dashboard" in dashboard_note and "it is missing" in dashboard_note
    assert (tmp_path / "grafana" / "provisioning" / "datasources" / "hyperfleet.yml").exists()


def test_up_without_prometheus_says_so_and_starts_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitoring.shutil, "which", lambda binary: None)
    settings = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path)})
    said: list[str] = []
    url = monitoring.start_prometheus(
        settings, stack._daemons(settings), 9091, tmp_path, [], said.append, "[4/8]"
    )
    assert url is None and said == [
        "[4/8] no Prometheus (prometheus is not installed): no metrics are kept"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_taken_prometheus_port_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's package starts its own service on 9090 where systemd runs."""
    monkeypatch.setattr(monitoring.shutil, "which", lambda binary: f"/usr/bin/{binary}")
    settings = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path)})
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(monitoring.MonitoringError, match="systemctl disable --now prometheus"):
            monitoring.start_prometheus(
                settings, stack._daemons(settings), port, tmp_path, [], lambda _: None, "[4/8]"
            )
    assert not (tmp_path / "run").exists()  # nothing was started


def test_ups_emulator_latency_flags_are_the_emulators_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.cli.commands import _emulator_flags

    args = build_parser().parse_args(
        ["up", "--emulator-ttft-ms", "500", "--emulator-tps", "50", "--emulator-jitter", "0.1"]
    )
    flags = _emulator_flags(args)
    emulator = build_parser().parse_args(["emulator", *flags])
    assert (emulator.ttft_ms, emulator.tps, emulator.jitter) == (500.0, 50.0, 0.1)
    monkeypatch.setenv("HYPERFLEET_HOME", str(tmp_path))
    assert main(["up", "--emulator-jitter", "2"]) == 2  # refused before anything starts
    assert "--emulator-jitter" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
