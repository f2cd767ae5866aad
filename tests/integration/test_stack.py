"""``hyperfleet up`` / ``status`` / ``down`` as a user runs them, with real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from cluster.processes import free_port

TIMEOUT_S = 60


def _hyperfleet(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env["HYPERFLEET_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_up_status_down(tmp_path: Path) -> None:
    port = free_port()
    up = _hyperfleet(tmp_path, "up", "--emulator-port", str(port))
    try:
        assert up.returncode == 0, up.stderr
        assert f"http://127.0.0.1:{port}" in up.stdout
        assert "Not there yet" in up.stdout
        key_file = tmp_path / "emulator.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/messages",
            data=json.dumps(
                {
                    "model": "claude-sonnet-5-5",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "hi"}],
                }
            ).encode(),
            headers={
                "x-api-key": key_file.read_text().strip(),
                "anthropic-version": "2023-06-01",
                "content-type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert json.loads(response.read())["type"] == "message"
        again = _hyperfleet(tmp_path, "up", "--emulator-port", str(port))
        assert again.returncode == 0, again.stderr
        status = json.loads(_hyperfleet(tmp_path, "status").stdout)
        assert status["emulator"]["running"] is True
    finally:
        down = _hyperfleet(tmp_path, "down")
    assert down.returncode == 0
    assert "stopped" in down.stdout
    assert json.loads(_hyperfleet(tmp_path, "status").stdout)["emulator"]["running"] is False
