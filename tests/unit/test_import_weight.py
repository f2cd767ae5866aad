"""What a process pays to import a piece: the heavy packages stay out where they are not used.

Each check runs in a fresh interpreter, since this one has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAND_INS = ["cluster.emulator", "cluster.hypercore_standin", "uvicorn", "starlette"]


def _imported_after(module: str, heavy: list[str]) -> list[str]:
    probe = (
        f"import json, sys; import {module}; "
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    found: list[str] = json.loads(out.stdout)
    return found


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        # The node agent (a VM's entrypoint) uses these: it must start in a fraction of a second.
        ("hyperfleet.errors", ["ray", "anthropic"]),
        ("actors.spec", ["ray", "anthropic"]),
        # Every agent replica loads the control-store actor's class to meter its turns.
        ("serve_app.backend", ["ray.serve", "fastapi", "anthropic"]),
        # A VM's entrypoint and the production provider load neither stand-in, nor uvicorn.
        ("cluster.node.agent", [*STAND_INS, "ray", "anthropic", "serve_app", "actors"]),
        ("autoscaling.provider", [*STAND_INS, "anthropic", "serve_app", "actors"]),
        # The scaling policy is plain Python: the simulation replays a day through it.
        ("autoscaling.pool_policy", ["ray", "anthropic", "pydantic", "serve_app", "actors"]),
        ("cluster.hypercore", STAND_INS),
    ],
)
def test_light_modules_do_not_import_heavy_packages(module: str, heavy: list[str]) -> None:
    assert _imported_after(module, heavy) == []


def _cli_imports(*argv: str) -> set[str]:
    """Every module ``hyperfleet ARGV`` imports, from ``python -X importtime``'s report."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cluster.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # [0] is the header


@pytest.mark.parametrize("argv", [("--help",), ("node", "--help"), ("emulator", "--help")])
def test_help_imports_only_the_parser(argv: tuple[str, ...]) -> None:
    modules = _cli_imports(*argv)
    assert "cluster.cli.commands" in modules  # the probe saw the command run
    heavy = ["pydantic", "ray", "anthropic", "actors", "serve_app", "cluster.node", *STAND_INS]
    assert sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy)) == []
