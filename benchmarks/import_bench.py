"""What starting a Hyperfleet command costs before it does anything: wall time and modules loaded.

Each case runs in a fresh interpreter (``python -X importtime``), ``--runs`` times, interleaved
with the same case in ``--against DIR`` (another checkout, e.g. an older commit's ``git archive``)
when given, so the machine's drift hits both alike. Reports the median wall time, the number of
modules imported, and which heavy packages or stand-ins were among them.

    python -m benchmarks.import_bench [--runs 5] [--against /tmp/old]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "cluster.emulator",
    "cluster.hypercore.standin",
    "cluster.hypercore_standin",
    "uvicorn",
    "pydantic",
    "ray",
    "anthropic",
    "actors",
    "serve_app",
    "cryptography",
    "psutil",
)
CASES = {
    "hyperfleet --help": ["-m", "cluster.cli", "--help"],
    "hyperfleet node --help": ["-m", "cluster.cli", "node", "--help"],
    "import the node agent": ["-c", "import cluster.node.agent"],
    "import the provider": ["-c", "import autoscaling.provider"],
}
# Where a case's module was before cluster/ was split by role (for an older --against tree).
BEFORE_THE_SPLIT = {"import cluster.node.agent": "import cluster.node"}
RUN_TIMEOUT_S = 120


def _run(cwd: Path, argv: list[str]) -> tuple[float, list[str]]:
    try:
        return _run_once(cwd, argv)
    except ModuleNotFoundError:
        if argv[-1] not in BEFORE_THE_SPLIT:
            raise
        return _run_once(cwd, [*argv[:-1], BEFORE_THE_SPLIT[argv[-1]]])


def _run_once(cwd: Path, argv: list[str]) -> tuple[float, list[str]]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    elapsed = time.perf_counter() - started
    if "ModuleNotFoundError" in done.stderr:
        raise ModuleNotFoundError(done.stderr[-500:])
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} in {cwd} failed:\n{done.stderr[-2000:]}")
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    return elapsed, [line.rsplit("|", 1)[1].strip() for line in lines[1:]]


def _heavy(modules: list[str]) -> list[str]:
    found = {h for h in HEAVY for m in modules if m == h or m.startswith(h + ".")}
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    trees = [("this tree", ROOT)] + ([("against", args.against)] if args.against else [])
    print(f"{'case':24} {'tree':10} {'median':>8} {'modules':>8}  heavy packages loaded")
    for name, argv in CASES.items():
        times: dict[str, list[float]] = {label: [] for label, _ in trees}
        loaded: dict[str, list[str]] = {}
        for _ in range(args.runs):
            for label, tree in trees:
                elapsed, modules = _run(tree, argv)
                times[label].append(elapsed)
                loaded[label] = modules
        for label, _ in trees:
            median_ms = statistics.median(times[label]) * 1000
            heavy = ", ".join(_heavy(loaded[label])) or "-"
            print(f"{name:24} {label:10} {median_ms:6.0f} ms {len(loaded[label]):8d}  {heavy}")


if __name__ == "__main__":
    main()
