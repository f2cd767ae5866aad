"""``hyperfleet loadtest``: virtual users against the HTTP API, measured and judged.

``users`` applies the load (closed and open loop, retries, SSE), ``tenant`` sets up and cleans
up the user, key and agent the test runs as, ``report`` aggregates and holds the JSON layout
(docs/loadtest.md), ``run`` orchestrates. ``generator`` is one load generator (a share of the
users, watched by ``monitor``, shown by ``progress``); with ``--workers N``, ``shares`` splits
the load and merges the results, and ``distributed`` runs the generators as Ray actors (the
one module that imports Ray, loaded for that alone), their outcomes shipped as ``columns``.
A client of the API only: it imports no replica, API or stand-in code.
"""

from .report import SCHEMA_VERSION, LoadTestReport, Outcome, Thresholds, build_report, summary
from .run import LoadTestConfig, run, run_loadtest
from .tenant import SetupError
from .users import Plan

__all__ = [
    "SCHEMA_VERSION",
    "LoadTestConfig",
    "LoadTestReport",
    "Outcome",
    "Plan",
    "SetupError",
    "Thresholds",
    "build_report",
    "run",
    "run_loadtest",
    "summary",
]
