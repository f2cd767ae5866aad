"""A Grafana provisioning folder for the local stack, for any Grafana a user points at it.

``up`` runs no Grafana (it would be the stack's heaviest part, and Prometheus answers queries
itself); it writes a folder that a Grafana run by hand loads as it starts:

    <folder>/grafana.ini                          loopback, embedding, anonymous viewers, paths
    <folder>/provisioning/datasources/hyperfleet.yml   the stack's Prometheus, the default source
    <folder>/provisioning/dashboards/hyperfleet.yml    two file providers: folders Ray, Hyperfleet
    <folder>/dashboards/ray/*.json                Ray's own dashboards, as its dashboard wrote them
    <folder>/dashboards/hyperfleet/hyperfleet.json     ``cluster.observability.dashboard``'s

Ray's dashboard writes its Grafana dashboards into its session folder
(``<session>/metrics/grafana/dashboards``, ``ray/dashboard/modules/metrics/metrics_head.py``)
when it starts, having deleted that folder first: they are copied from there once it is done,
and no Grafana reads Ray's folder itself. Its Metrics view embeds them by their uids from the
Grafana at ``RAY_GRAFANA_HOST``, which is why the configuration allows embedding and anonymous
viewers (as Ray's own ``grafana.ini`` does), and why Grafana listens on loopback alone.

Every path in the files is absolute, so a Grafana in a container reads them when the folder is
mounted at the same path. Every file is written 0600 and every folder is 0700, as the rest of
``$HYPERFLEET_HOME`` (``hyperfleet/private.py``): a Grafana must run as their owner.
"""

from __future__ import annotations

import importlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hyperfleet.private import create_private, private_dir, write_private

DATASOURCE_NAME = "Prometheus"  # Ray's dashboard passes this name to the dashboards it embeds
DATASOURCE_UID = "prometheus"
RAY_FOLDER = "ray"
HYPERFLEET_FOLDER = "hyperfleet"
DASHBOARD_MODULE = "cluster.observability.dashboard"
# Ray's metrics module writes its Grafana files, then its Prometheus file: the last one there
# means the dashboards are complete.
RAY_WRITTEN_LAST = Path("prometheus", "prometheus.yml")
RAY_WAIT_POLL_S = 0.2


@dataclass(frozen=True)
class Provisioned:
    """What ``provision`` wrote, and what it could not (``notes``, for the user)."""

    folder: Path
    config_file: Path
    provisioning: Path
    ray_dashboards: tuple[str, ...]
    hyperfleet_dashboard: Path | None
    notes: tuple[str, ...]


def provision(
    folder: Path,
    prometheus_url: str,
    grafana_port: int,
    ray_session_dir: Path | None,
    wait_s: float,
) -> Provisioned:
    """Writes Grafana's configuration and provisioning under ``folder`` (replacing what an
    earlier run wrote): Prometheus at ``prometheus_url`` as the default data source, Ray's
    dashboards from ``ray_session_dir`` (waiting up to ``wait_s`` for its dashboard to have
    written them), and Hyperfleet's dashboard."""
    private_dir(folder)
    provisioning = private_dir(folder / "provisioning")
    dashboards = private_dir(folder / "dashboards")
    notes: list[str] = []

    config_file = folder / "grafana.ini"
    write_private(config_file, _grafana_ini(folder, provisioning, grafana_port))
    write_private(
        private_dir(provisioning / "datasources") / "hyperfleet.yml",
        yaml.safe_dump(_datasources(prometheus_url), sort_keys=False),
    )
    write_private(
        private_dir(provisioning / "dashboards") / "hyperfleet.yml",
        yaml.safe_dump(_providers(dashboards), sort_keys=False),
    )

    ray_written: list[str] = []
    if ray_session_dir is None:
        notes.append("no Ray session folder: Ray's dashboards were not copied")
    else:
        source = ray_session_dir / "metrics" / "grafana" / "dashboards"
        if _wait_for(ray_session_dir / "metrics" / RAY_WRITTEN_LAST, wait_s):
            ray_written = _copy_dashboards(source, private_dir(dashboards / RAY_FOLDER))
        else:
            notes.append(f"Ray's dashboard wrote no Grafana dashboards in {wait_s:.0f} s")

    hyperfleet_dashboard, note = _hyperfleet_dashboard(private_dir(dashboards / HYPERFLEET_FOLDER))
    if note:
        notes.append(note)
    return Provisioned(
        folder,
        config_file,
        provisioning,
        tuple(ray_written),
        hyperfleet_dashboard,
        tuple(notes),
    )


def _grafana_ini(folder: Path, provisioning: Path, port: int) -> str:
    # Grafana's default admin is admin/admin: a Grafana started with this folder gets a
    # password of its own instead, kept beside it (0600; read it to log in as admin).
    password_file = folder / "admin_password"
    create_private(password_file, secrets.token_urlsafe(24).encode())
    password = password_file.read_text().strip()
    return (
        "; Written by `hyperfleet up` at each start; edits are lost.\n"
        "[server]\n"
        "http_addr = 127.0.0.1\n"
        f"http_port = {port}\n"
        "\n[security]\n"
        "admin_user = admin\n"
        f"admin_password = {password}\n"
        "allow_embedding = true\n"  # Ray's dashboard shows Grafana's panels in iframes
        "\n[auth.anonymous]\n"
        "enabled = true\n"
        "org_role = Viewer\n"
        "\n[paths]\n"
        f"provisioning = {provisioning}\n"
        f"data = {folder / 'data'}\n"
        f"logs = {folder / 'logs'}\n"
    )


def _datasources(prometheus_url: str) -> dict[str, Any]:
    source = {
        "name": DATASOURCE_NAME,
        "uid": DATASOURCE_UID,
        "type": "prometheus",
        "access": "proxy",
        "url": prometheus_url,
        "isDefault": True,
        "jsonData": {"timeInterval": "5s"},  # the stack's scrape interval
    }
    return {"apiVersion": 1, "datasources": [source]}


def _providers(dashboards: Path) -> dict[str, Any]:
    def provider(name: str, sub: str) -> dict[str, Any]:
        return {
            "name": name,
            "folder": name,
            "type": "file",
            "disableDeletion": True,
            "options": {"path": str(dashboards / sub)},
        }

    return {
        "apiVersion": 1,
        "providers": [provider("Ray", RAY_FOLDER), provider("Hyperfleet", HYPERFLEET_FOLDER)],
    }


def _wait_for(path: Path, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(RAY_WAIT_POLL_S)
    return True


def _copy_dashboards(source: Path, target: Path) -> list[str]:
    """Copies each dashboard JSON of ``source`` into ``target`` (0600), dropping what an
    older Ray left there. Returns the names copied."""
    copied = []
    for path in sorted(source.glob("*.json")):
        write_private(target / path.name, path.read_bytes())
        copied.append(path.name)
    for stale in target.glob("*.json"):
        if stale.name not in copied:
            stale.unlink()
    return copied


def _hyperfleet_dashboard(target: Path) -> tuple[Path | None, str | None]:
    """Hyperfleet's dashboard from ``cluster.observability.dashboard.dashboard_json()`` (a JSON
    text or a dict), or None and why not."""
    try:
        module: Any = importlib.import_module(DASHBOARD_MODULE)
    except ModuleNotFoundError as e:  # the module, or a library it needs (grafanalib)
        missing = "it is missing" if e.name == DASHBOARD_MODULE else f"{e.name} is not installed"
        return None, f"no Hyperfleet dashboard ({DASHBOARD_MODULE}: {missing})"
    produced = module.dashboard_json()
    dashboard = json.loads(produced) if isinstance(produced, str | bytes) else produced
    path = target / "hyperfleet.json"
    write_private(path, json.dumps(dashboard, indent=1))
    return path, None
