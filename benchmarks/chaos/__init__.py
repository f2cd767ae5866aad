"""Chaos runs (issue 17): a workload from the load tester's engine writing a client history, a
seeded schedule of faults injected meanwhile, and a checker over the history and the stores.

``history`` is the client history (JSON lines), ``checker`` the pure checks over it and the
state read back (``readback``), ``faults`` the injectors, ``schedule`` the seeded fault plan,
``run`` one run against an API, ``table`` its report as a table; ``python -m benchmarks.chaos``
runs it on a local stack of its own. Node-level faults (a worker VM's SIGTERM or SIGKILL
through the Hypercore stand-in, a network partition) are ``node_faults``, run on the stand-in
cluster by ``python -m benchmarks.chaos.cluster_run``. ``docs/chaos.md`` says how to run and read
them.
"""

from .checker import FinalState, Report, check
from .history import Fault, History, Request
from .run import ChaosPlan, Control, run_chaos

__all__ = [
    "ChaosPlan",
    "Control",
    "Fault",
    "FinalState",
    "History",
    "Report",
    "Request",
    "check",
    "run_chaos",
]
