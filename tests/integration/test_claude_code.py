"""The Claude Code CLI (bundled in the claude-agent-sdk wheel) against the emulator."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import claude_agent_sdk
import pytest

from .conftest import EmulatorServer

CLI = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
RUN_TIMEOUT_S = 90

pytestmark = pytest.mark.claude_code


def _claude(emulator: EmulatorServer, home: Path, *args: str) -> dict[str, Any]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ANTHROPIC_API_KEY": emulator.api_key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    done = subprocess.run(
        [str(CLI), "-p", *args, "--output-format", "json"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_claude_code_completes_a_prompt(emulator: EmulatorServer, tmp_path: Path) -> None:
    before = emulator.stats()["statuses"]
    result = _claude(emulator, tmp_path, "Say hello to the emulator")
    assert result["is_error"] is False and result["subtype"] == "success"
    assert "Say hello to the emulator" in result["result"]
    assert result["usage"]["output_tokens"] > 0
    after = emulator.stats()["statuses"]
    assert after.get("400", 0) == before.get("400", 0), "Claude Code sent something we refused"


def test_claude_code_bash_round_trip(emulator: EmulatorServer, tmp_path: Path) -> None:
    directive = '[[tool Bash {"command": "echo hf-$((6*7))", "description": "print a marker"}]]'
    result = _claude(emulator, tmp_path, directive, "--allowedTools", "Bash")
    assert result["is_error"] is False
    assert result["num_turns"] == 2
    assert result["result"] == 'The tool Bash returned: "hf-42".'
