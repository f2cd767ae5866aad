"""``hyperfleet loadtest`` as a user runs it (a subprocess) against the session's real API:
a small run passes and writes a result file in its documented layout, thresholds set to fail
exit 1 naming the criterion, the seed's flags work, and a refused key is a message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.loadtest import LoadTestReport

from .conftest import ApiServer, EmulatorServer

RUN_TIMEOUT_S = 90.0


def _loadtest(
    *flags: str, home: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERFLEET_")}
    env["HYPERFLEET_HOME"] = str(home)
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli.commands", "loadtest", *flags],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
    )


def test_a_small_streamed_run_passes_and_writes_its_layout(
    api_server: ApiServer, emulator: EmulatorServer, tmp_path: Path
) -> None:
    result_file = tmp_path / "result.json"
    flags = ["--api-url", api_server.base_url, "--api-key", api_server.admin_key]
    flags += ["--anthropic-key", emulator.api_key, "--users", "5", "--requests", "2"]
    flags += ["--stream", "--tools-mix", "0.5", "--json", str(result_file)]
    done = _loadtest(*flags, home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout and "warning: cleanup" not in done.stderr
    report = LoadTestReport.model_validate_json(result_file.read_text())
    assert report.schema_version == 1 and report.passed and report.failed_criteria == []
    assert (report.completed, report.failed, report.sessions_opened) == (10, 0, 5)
    assert report.tool_calls >= 1 and report.total_output_tokens > 0
    assert report.p95_ttft_ms is not None and report.p95_ttft_ms <= report.max_e2el_ms  # type: ignore[operator]
    assert sum(b.completed for b in report.timeline) == 10


def test_thresholds_set_to_fail_exit_1_and_name_the_criterion(
    api_server: ApiServer, tmp_path: Path
) -> None:
    flags = ["--api-url", api_server.base_url, "--users", "2", "--requests", "1"]
    done = _loadtest(
        *flags,
        "--p95-max",
        "0.000001",
        home=tmp_path,
        extra_env={"HYPERFLEET_API_KEY": api_server.admin_key},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout
    assert "failed: p95 latency" in done.stdout and "> --p95-max 1e-06 s" in done.stdout


def test_the_seeds_flags_run_with_the_admin_key_file(
    api_server: ApiServer, emulator: EmulatorServer, tmp_path: Path
) -> None:
    (tmp_path / "admin.key").write_text(api_server.admin_key + "\n")
    flags = ["--api-url", api_server.base_url, "--anthropic-key", emulator.api_key]
    done = _loadtest(*flags, "--users", "2", "--requests", "2", home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 completed, 0 failed" in done.stdout


@pytest.mark.parametrize("key", ["hf_aaaaaaaaaaaa_" + "b" * 40])
def test_a_refused_key_is_a_message_and_exit_2(
    api_server: ApiServer, tmp_path: Path, key: str
) -> None:
    done = _loadtest("--api-url", api_server.base_url, "--api-key", key, home=tmp_path)
    assert done.returncode == 2
    assert "refused the key (401 unauthorized" in done.stderr and "Traceback" not in done.stderr
