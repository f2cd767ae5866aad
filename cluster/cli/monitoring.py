"""What ``hyperfleet up`` runs to watch the stack: Ray's dashboard on the head, the stack's own
Prometheus (a daemon, as Redis and the emulator are), and a Grafana provisioning folder.

The dashboard is part of the Ray head (``servers.ray_head_argv``); its environment points its
Metrics view at the stack's Prometheus and at a Grafana on loopback (``head_env``). Prometheus
must start after the head: its targets are in a file in the head's session folder, which exists
only once the head runs (``cluster.observability.prometheus``). Ray's Grafana dashboards are
written by the dashboard as it starts, so the provisioning folder is written last.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from cluster.observability import grafana, prometheus
from cluster.observability.ports import loopback_url
from hyperfleet.private import PRIVATE_UMASK, private_dir, write_private
from hyperfleet.processes import free_port, tail, wait_http_ok, wait_port

from .daemon import Daemons
from .settings import Settings

PROMETHEUS = "prometheus"
READY_TIMEOUT_S = 60.0
RAY_DASHBOARDS_WAIT_S = 30.0
# The Ray dashboard's health route that needs no token (ray/dashboard/http_server_head.py's
# public paths; its /api/healthz is the agent's, a 404 on the head in Ray 2.60).
DASHBOARD_HEALTH_PATH = "/api/gcs_healthz"


class MonitoringError(Exception):
    """Prometheus could not be started; the message says what to look at."""


def head_env(prometheus_port: int, grafana_port: int) -> dict[str, str]:
    """The Ray head's environment for its dashboard (``metrics_head.py`` reads it): the
    stack's Prometheus and a Grafana on loopback.

    And free ports for the metrics of the dashboard and of the autoscaler's monitor: Ray 2.60
    serves them on fixed ports (44227, 44217) and lists those addresses for Prometheus even when
    another cluster on the machine holds the port (its bind fails, and is only logged), so the
    stack's Prometheus would scrape that other cluster's."""
    return {
        "RAY_PROMETHEUS_HOST": loopback_url(prometheus_port),
        "RAY_GRAFANA_HOST": loopback_url(grafana_port),
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "AUTOSCALER_METRIC_PORT": str(free_port()),
    }


def ray_session_dir() -> Path:
    """The session folder of the head this driver is connected to (``ray.init`` first).

    Ray has no public call for it; its ``Node`` reads it from the head's node record in the GCS
    when it connects (``ray/_private/node.py``, Ray 2.60)."""
    from ray._private import worker

    node = worker._global_node
    if node is None:
        raise RuntimeError("ray.init() first: no Ray node in this process")
    return Path(node.get_session_dir_path())


def start_prometheus(
    settings: Settings,
    daemons: Daemons,
    port: int,
    session_dir: Path,
    rule_files: Sequence[Path],
    progress: Callable[[str], None],
    step: str,
) -> str | None:
    """Writes Prometheus's configuration under ``$HYPERFLEET_HOME/prometheus`` and starts it on
    127.0.0.1:``port``, or makes a running one read the new configuration (the head's session
    folder changes when the head restarts). Returns its URL, or None when it is not installed.

    Raises:
        MonitoringError: the port is someone else's, or it did not become ready.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        progress(f"{step} no Prometheus (prometheus is not installed): no metrics are kept")
        return None
    listen = f"127.0.0.1:{port}"
    url = loopback_url(port)
    progress(f"{step} Prometheus on {listen}, scraping Ray every {prometheus.SCRAPE_INTERVAL_S} s")
    folder = private_dir(settings.home / PROMETHEUS)
    config_file = folder / "prometheus.yml"
    rules = [p for p in rule_files if p.is_file()]
    text = prometheus.config_text(prometheus.discovery_file(session_dir), listen, rules)
    changed = not config_file.exists() or config_file.read_text() != text
    write_private(config_file, text)
    if daemons.state(PROMETHEUS).running:
        if changed:
            daemons.signal(PROMETHEUS, signal.SIGHUP)
        return url
    if wait_port(port, 0.2):
        raise MonitoringError(
            f"something else listens on {listen} (Debian's prometheus service? "
            "`systemctl disable --now prometheus`); or choose another --prometheus-port"
        )
    data = private_dir(folder / "data")
    argv = prometheus.argv(binary, config_file, data, listen)
    server = daemons.start(PROMETHEUS, argv, dict(os.environ), PRIVATE_UMASK)
    if not wait_http_ok(url + "/-/ready", READY_TIMEOUT_S) or not daemons.state(PROMETHEUS).running:
        daemons.stop(PROMETHEUS)
        raise MonitoringError(f"Prometheus did not start; its log:\n{tail(server.log)}")
    return url


def provision_grafana(
    settings: Settings,
    prometheus_port: int,
    grafana_port: int,
    session_dir: Path,
    progress: Callable[[str], None],
    step: str,
) -> grafana.Provisioned:
    """Writes ``$HYPERFLEET_HOME/grafana`` (``cluster.observability.grafana``) and says what
    it could not provide."""
    folder = settings.home / "grafana"
    progress(f"{step} Grafana provisioning in {folder} ...")
    done = grafana.provision(
        folder, loopback_url(prometheus_port), grafana_port, session_dir, RAY_DASHBOARDS_WAIT_S
    )
    for note in done.notes:
        progress(f"note: {note}")
    return done
