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
    ],
)
def test_light_modules_do_not_import_heavy_packages(module: str, heavy: list[str]) -> None:
    assert _imported_after(module, heavy) == []
