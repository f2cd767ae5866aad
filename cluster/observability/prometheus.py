"""The local stack's Prometheus: its configuration and its command line.

Where the targets come from. A Ray head writes the address of every node's metrics agent (and
of the dashboard's own metrics) to ``prom_metrics_service_discovery.json`` in its session folder
every few seconds (``PrometheusServiceDiscoveryWriter``, ``ray/_private/metrics_agent.py``, run
by the dashboard's reporter module: only while the dashboard runs). A link of that name in Ray's
temp folder (``/tmp/ray``) follows whichever cluster on the machine wrote last, and the tests or a
user's own ``ray start`` run clusters beside the stack's; so the configuration names the stack's
own head's session folder, which is new at each start of the head (``up`` then rewrites the
configuration and reloads Prometheus).

Names. Ray exports a ``ray.util.metrics`` metric as ``ray_<name>``; a ``metric_relabel_configs``
rule renames ``ray_hyperfleet_*`` to ``hyperfleet_*`` when scraped, so dashboards and alerts use
the catalogue's names (``docs/observability.md``).

Rules. Only rule files that exist are named. Prometheus would skip a missing one itself (rule
files are globs), but a configuration that names what is there says what is loaded.

Limits. One machine, a few targets: a scrape every 5 s (a fleet would scrape every 15-30 s), a
day of data kept and never more than 1 GB, on loopback alone (Prometheus has no auth of its own).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

# ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE (Ray 2.60)
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
SCRAPE_INTERVAL_S = 5
SCRAPE_TIMEOUT_S = 4  # below the interval, as Prometheus requires
EVALUATION_INTERVAL_S = 5
RETENTION_TIME = "1d"
RETENTION_SIZE = "1GB"
RAY_JOB = "ray"
# Renames Ray's export of Hyperfleet's metrics to the catalogue's names.
HYPERFLEET_RENAME = {
    "source_labels": ["__name__"],
    "regex": "ray_hyperfleet_(.*)",
    "target_label": "__name__",
    "replacement": "hyperfleet_$1",
}
# Hyperfleet's alerting rules (written beside this module; optional).
ALERT_RULES = Path(__file__).with_name("alerts.yml")


def discovery_file(ray_session_dir: Path) -> Path:
    """The service-discovery file a Ray head with this session folder writes."""
    return ray_session_dir / DISCOVERY_FILE


def config_text(discovery: Path, listen_address: str, rule_files: Iterable[Path]) -> str:
    """Prometheus's configuration (YAML): every Ray node that ``discovery`` lists, with
    Hyperfleet's names, and Prometheus itself at ``listen_address``; the ``rule_files`` that
    exist, as absolute paths."""
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_TIMEOUT_S}s",
            "evaluation_interval": f"{EVALUATION_INTERVAL_S}s",
        },
        "rule_files": [str(p.resolve()) for p in rule_files if p.is_file()],
        "scrape_configs": [
            {
                "job_name": RAY_JOB,
                "file_sd_configs": [{"files": [str(discovery)]}],
                "metric_relabel_configs": [HYPERFLEET_RENAME],
            },
            {"job_name": "prometheus", "static_configs": [{"targets": [listen_address]}]},
        ],
    }
    header = "# Written by `hyperfleet up` at each start; edits are lost.\n"
    body: str = yaml.safe_dump(config, sort_keys=False)
    return header + body


def argv(binary: str, config_file: Path, storage_dir: Path, listen_address: str) -> list[str]:
    """``prometheus`` on ``listen_address`` with ``config_file``, keeping its data in
    ``storage_dir`` for ``RETENTION_TIME`` and at most ``RETENTION_SIZE``. Run it with a 077
    umask in a private folder: Prometheus has no setting for the mode of its files. SIGHUP
    makes it read its configuration and rule files again; no HTTP endpoint can stop it."""
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={storage_dir}",
        f"--storage.tsdb.retention.time={RETENTION_TIME}",
        f"--storage.tsdb.retention.size={RETENTION_SIZE}",
        f"--web.listen-address={listen_address}",
    ]
