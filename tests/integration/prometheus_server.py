"""A real Prometheus for a test: Debian's ``/usr/bin/prometheus`` on a free loopback port,
scraping the targets the test names every second, its configuration and data in the test's
temporary folder.

Why a real one. The dashboard's panels are PromQL; whether a panel shows anything depends on
what Prometheus makes of the scraped text (a histogram's ``_bucket`` series, ``rate`` over two
samples, a label matcher), which no parser of our own would tell. So a test that has driven a
process's traffic points this at the process's ``/metrics`` and runs the panels' own queries
(``panel_queries()``), the way Grafana would.

When a query has data. ``rate`` and ``increase`` need two samples of a series in their window,
so ``wait_for_scrape`` waits for two scrapes that began after it was called: call it after the
last traffic. A query that divides by a rate, or a quantile of one, is NaN unless the counter
grew between two scrapes, so ``require_panel_data`` counts a series only when its value is a
number: a NaN is a panel with nothing to draw. The targets API may report a scrape before its
samples are committed, so ``require_panel_data`` itself polls too, for a few scrapes at most.

When to start it. Prometheus 2.42 hands new targets to its scrapers at most every 5 s, so its
first scrape comes up to ~6 s after it starts: start it before the traffic, not after.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.observability import prometheus as stack_prometheus
from cluster.observability.dashboard import panel_queries
from hyperfleet.processes import free_port, spawn, stop, tail

PROMETHEUS = "/usr/bin/prometheus"  # Debian's package, as in the local stack's prerequisites
JOB = "hyperfleet"
SCRAPE_INTERVAL_S = 1
READY_TIMEOUT_S = 30.0
SCRAPES_WAIT_S = 30.0  # two scrapes at 1 s, with room for a loaded machine
PANEL_DATA_WAIT_S = 5.0  # a few scrapes: the last one's samples may land after its report
POLL_S = 0.1
HTTP_TIMEOUT_S = 10.0
STOP_GRACE_S = 10.0  # Prometheus flushes its head block on SIGTERM; a test's is tiny
LEFTOVER_GRACE_S = 2.0
KILL_WAIT_S = 10.0


@dataclass(frozen=True)
class Target:
    """A process to scrape: ``address`` is ``host:port``, ``path`` its metrics path."""

    address: str
    path: str = "/metrics"


def config_text(targets: Sequence[Target]) -> str:
    """One job, scraping each target every second at its own metrics path."""
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [t.address], "labels": {"__metrics_path__": t.path}}
                    for t in targets
                ],
            }
        ],
    }
    text: str = yaml.safe_dump(config, sort_keys=False)
    return text


def panels_naming(*metrics: str) -> list[tuple[str, str]]:
    """The (panel title, query) pairs of the Hyperfleet dashboard whose query names one of
    ``metrics`` (a name, or a prefix such as ``hyperfleet_hypercore_``)."""
    names = re.compile(r"\b(?:" + "|".join(re.escape(m) for m in metrics) + ")")
    return [(title, expr) for title, expr in panel_queries() if names.search(expr)]


def _seconds(rfc3339: str) -> float:
    """Prometheus's timestamps (Go's RFC 3339, nanoseconds) as Unix seconds."""
    head, dot, fraction = rfc3339.partition(".")
    if dot:  # Python reads at most microseconds
        digits = len(fraction) - len(fraction.lstrip("0123456789"))
        rfc3339 = f"{head}.{fraction[: min(digits, 6)]}{fraction[digits:]}"
    return datetime.fromisoformat(rfc3339).timestamp()


def _has_value(result: dict[str, Any]) -> bool:
    """Whether an instant vector's sample is a number (Prometheus sends values as strings)."""
    return not math.isnan(float(result["value"][1]))


class Prometheus:
    """A running Prometheus, asked over its HTTP API."""

    def __init__(self, url: str, targets: Sequence[Target], log: Path) -> None:
        self.url = url
        self.log = log
        self._targets = targets
        self._http = httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S)

    def close(self) -> None:
        self._http.close()

    def wait_ready(self, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
        """Until ``/-/ready`` answers 200 (False if ``process`` exits or ``timeout_s`` passes:
        a port taken meanwhile, a configuration it refuses)."""
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if self._http.get("/-/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one result) that ``expr`` gives now."""
        answer = self._http.get("/api/v1/query", params={"query": expr})
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", (expr, body)
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active targets, as ``/api/v1/targets`` lists them."""
        answer = self._http.get("/api/v1/targets", params={"state": "active"})
        answer.raise_for_status()
        active: list[dict[str, Any]] = answer.json()["data"]["activeTargets"]
        return active

    def wait_for_scrape(self, timeout_s: float = SCRAPES_WAIT_S, scrapes: int = 2) -> None:
        """Until every target is up and has been scraped ``scrapes`` times since this call began
        (so, called after a test's traffic, a counter it moved has two samples after it).

        Raises:
            AssertionError: ``timeout_s`` passed first; says each target's last state.
        """
        since_s = time.time()
        seen: dict[str, set[str]] = {}  # a scrape is known by its start time
        deadline = time.monotonic() + timeout_s
        while True:
            active = self.targets()
            for target in active:
                last = target["lastScrape"]
                if target["health"] == "up" and _seconds(last) > since_s:
                    seen.setdefault(target["scrapeUrl"], set()).add(last)
            done = len(active) == len(self._targets) and all(
                len(seen.get(t["scrapeUrl"], ())) >= scrapes and t["health"] == "up" for t in active
            )
            if done:
                return
            if time.monotonic() >= deadline:
                state = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in active]
                raise AssertionError(
                    f"Prometheus did not scrape every target {scrapes} times in {timeout_s:g} s: "
                    f"{state}, scrapes seen {seen}"
                )
            time.sleep(POLL_S)

    def require_panel_data(
        self, panels: Iterable[tuple[str, str]], timeout_s: float = PANEL_DATA_WAIT_S
    ) -> None:
        """Every (panel title, query) gives at least one series with a value (not NaN), within
        ``timeout_s``.

        Raises:
            AssertionError: naming each panel and query that gave nothing, and what it gave.
        """
        waiting = list(panels)
        assert waiting, "no panel queries to check"
        last: dict[tuple[str, str], list[dict[str, Any]]] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for panel in waiting:
                last[panel] = self.query(panel[1])
            waiting = [p for p in waiting if not any(_has_value(r) for r in last[p])]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                lines = [f"  panel {t!r}: {q}\n    gave {last[(t, q)]}" for t, q in waiting]
                raise AssertionError(
                    f"{len(waiting)} panel queries gave no data from {self.url} within "
                    f"{timeout_s:g} s:\n" + "\n".join(lines)
                )
            time.sleep(POLL_S)


@contextmanager
def prometheus_server(targets: Sequence[Target], folder: Path) -> Iterator[Prometheus]:
    """Starts Prometheus scraping ``targets`` every second, its configuration, data and log in
    ``folder``; stops it (SIGTERM, then SIGKILL after a bound) on exit.

    Raises:
        AssertionError: Prometheus is not installed, or did not become ready (with its log).
    """
    binary = shutil.which(PROMETHEUS)
    assert binary is not None, f"{PROMETHEUS} is not installed (Debian's prometheus package)"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(config_text(targets))
    log = folder / "prometheus.log"
    listen = f"127.0.0.1:{free_port()}"
    argv = stack_prometheus.argv(binary, config, folder / "data", listen)
    process = spawn(argv, log=log)
    server = Prometheus(f"http://{listen}", targets, log)
    try:
        assert server.wait_ready(process, READY_TIMEOUT_S), (
            f"Prometheus did not start:\n{tail(log)}"
        )
        yield server
    finally:
        server.close()
        stop(
            process,
            STOP_GRACE_S,
            leftover_grace_s=LEFTOVER_GRACE_S,
            kill_wait_s=KILL_WAIT_S,
        )


StartPrometheus = Callable[[Sequence[Target]], Prometheus]


@pytest.fixture(name="prometheus")
def prometheus_fixture(tmp_path: Path) -> Iterator[StartPrometheus]:
    """Starts a Prometheus scraping the targets given, in the test's temporary folder; it is
    stopped after the test. A module uses it by importing ``prometheus_fixture``."""
    with ExitStack() as servers:
        yield lambda targets: servers.enter_context(
            prometheus_server(targets, tmp_path / "prometheus")
        )
