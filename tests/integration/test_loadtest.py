"""``hyperfleet loadtest`` as a user runs it (a subprocess) against the session's real API:
a small run passes and writes a result file in its documented layout, thresholds set to fail
exit 1 naming the criterion, the seed's flags work, and a refused key is a message. With
``--workers 2`` its generators run as actors on the session's Ray cluster and their results
merge into one report; a generator that dies fails the run, and the other's are reported."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import ray

from cluster.loadtest import LoadTestReport, Thresholds, build_report
from cluster.loadtest.distributed import Fleet
from cluster.loadtest.run import run_config
from cluster.loadtest.shares import merge, run_bound_s, split
from cluster.loadtest.tenant import provision, release
from cluster.loadtest.users import Plan

from .conftest import ApiServer, EmulatorServer, RayCluster

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


def test_two_workers_on_the_ray_cluster_merge_into_one_report(
    api_server: ApiServer, emulator: EmulatorServer, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    result_file = tmp_path / "result.json"
    flags = ["--api-url", api_server.base_url, "--api-key", api_server.admin_key]
    flags += ["--anthropic-key", emulator.api_key, "--users", "5", "--requests", "3"]
    flags += ["--workers", "2", "--ray-address", ray_cluster.address, "--json", str(result_file)]
    done = _loadtest(*flags, home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 load generators on 1 node(s) of the Ray cluster" in done.stderr
    assert "2 processes, the busiest at" in done.stdout
    report = LoadTestReport.model_validate_json(result_file.read_text())
    # 5 users split 3 and 2: every user of both generators, each of its messages once.
    assert (report.completed, report.failed, report.sessions_opened) == (15, 0, 5)
    assert report.client.processes == 2 and report.client.cpu_s > 0
    assert sum(b.started for b in report.timeline) == 15 and report.passed


async def test_a_generator_that_dies_fails_the_run_and_the_others_results_remain(
    api_server: ApiServer, emulator: EmulatorServer, ray_cluster: RayCluster
) -> None:
    plan = Plan(users=2, requests=2)
    run_id = secrets.token_hex(4)
    async with aiohttp.ClientSession() as http:
        provisioned = await provision(
            http, api_server.base_url, api_server.admin_key, plan, emulator.api_key, run_id
        )
        try:
            # This process is the session's driver already: the fleet joins nothing new.
            fleet = await Fleet.start(None, split(plan, 2, run_id))
            try:
                ray.kill(fleet.actors[1], no_restart=True)
                running = asyncio.create_task(fleet.run(provisioned.target, run_bound_s(plan)))
                assert (await fleet.poll())[1] is None  # a dead generator has no counts
                results = await running
                for _ in range(3):  # an answer to an earlier poll may come first
                    polled = await fleet.poll()
                    if polled[0] is not None and polled[0].completed == 2:
                        break
            finally:
                fleet.stop()
        finally:
            assert await release(http, api_server.base_url, api_server.admin_key, provisioned) == []
    assert ray.is_initialized()
    assert polled[0] is not None and polled[0].completed == 2 and polled[1] is None
    assert results[0].error is None and results[1].error is not None
    assert "kill" in results[1].error, results[1].error
    merged = merge(results)
    report = build_report(
        merged.outcomes,
        config=run_config(plan),
        api_url=api_server.base_url,
        date="2025-01-01T00:00:00Z",
        duration_s=merged.elapsed_s,
        thresholds=Thresholds(),
        client=merged.client,
        run_failures=merged.failures,
    )
    assert (report.completed, report.sessions_opened, report.client.processes) == (2, 1, 2)
    assert not report.passed
    assert report.failed_criteria[0].startswith("load generator 1 of 2 failed on node ")
