"""The stand-in's host in-process: addresses, env, bounded logs and the List cache's batch marker.

Workloads here are real ``sleep`` processes; the full behaviour over the wire is in
tests/integration/test_hypercore_conformance.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.hypercore import proto
from cluster.hypercore_standin import Host, HostError, Image, ImageCatalog
from cluster.hypercore_standin.host import AddressPool, workload_tmp_dir, workload_tmp_root
from cluster.hypercore_standin.workload import LOG_TAIL_BYTES, _BoundedLog, read_tail, workload_env

SLEEP = ImageCatalog({"sleep:1": Image(("sleep", "60"))})


def test_addresses_are_distinct_round_robin_and_bounded() -> None:
    pool = AddressPool(ipaddress.IPv4Network("127.88.0.0/29"), start=0)
    first = [pool.allocate() for _ in range(5)]
    assert first == [f"127.88.0.{i}" for i in range(2, 7)]
    with pytest.raises(HostError, match="cannot spawn container: no address left"):
        pool.allocate()
    pool.release("127.88.0.3")
    assert pool.allocate() == "127.88.0.3"


def test_workload_env_is_host_basics_then_image_then_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/secret")
    monkeypatch.setenv("TMPDIR", "/host-tmp")
    env = workload_env(["A=image", "B=image"], ["B=request", "C=x=y"], tmp_path, tmp_path / "t")
    assert env["PATH"] == "/usr/bin" and env["HOME"] == str(tmp_path)
    assert env["TMPDIR"] == str(tmp_path / "t")  # its own, not the host's
    assert (env["A"], env["B"], env["C"]) == ("image", "request", "x=y")
    assert "RAY_AUTH_TOKEN_PATH" not in env  # the host's secrets stay on the host


def test_logs_keep_their_tail(tmp_path: Path) -> None:
    log = _BoundedLog(tmp_path / "w")
    line = b"x" * 1023 + b"\n"
    for _ in range(3 * 1024):  # 3 MiB
        log.write(line)
    log.write(b"last\n")
    log.close()
    assert (tmp_path / "w").stat().st_size < 2 * LOG_TAIL_BYTES
    tail = read_tail(tmp_path / "w")
    assert len(tail) == LOG_TAIL_BYTES and tail.endswith(b"last\n")


async def test_the_cache_marks_the_refresh_that_changed_the_workloads(tmp_path: Path) -> None:
    host = Host(SLEEP, tmp_path, "example.com", cpu_count=2)
    try:
        assert host.cached_state() is None
        await host.refresh()
        assert host.cached_state().node.ip == ""  # no workloads: no batch to broadcast
        spawned = [await host.spawn(proto.VmSpawnRequest(image_ref="sleep:1")) for _ in range(11)]
        await host.refresh()
        state = host.cached_state()
        assert len(state.workloads) == 11
        # Eleven workloads broadcast in two parts: the marker of the last one stays.
        assert re.fullmatch(r"[0-9a-f-]{36}_finish", state.node.ip)
        await host.refresh()
        assert host.cached_state().node.ip == ""  # unchanged: nothing broadcast
        await host.stop(spawned[0].id)
        await host.refresh()
        # Ten fit in one part, marked complete.
        assert re.fullmatch(r"[0-9a-f-]{36}_complete", host.cached_state().node.ip)
    finally:
        await host.shutdown()
    assert not list((tmp_path / "workloads").iterdir())


# Each workload's own TMPDIR, as a VM's own /tmp: Ray names a node's sockets by the first index
# free in its temp dir, so two nodes starting at once in a shared one took the same socket.
TMP_PROBE = ImageCatalog({"tmp:1": Image(("sh", "-c", 'touch "$TMPDIR/x" && exec sleep 60'))})


async def test_each_workload_has_its_own_short_tmpdir_removed_with_it(tmp_path: Path) -> None:
    host = Host(TMP_PROBE, tmp_path, "example.com", cpu_count=2)
    try:
        first, second = [
            await host.spawn(proto.VmSpawnRequest(image_ref="tmp:1")) for _ in range(2)
        ]
        tmps = [workload_tmp_dir(w.id) for w in (first, second)]
        assert tmps[0] != tmps[1]
        for tmp in tmps:
            # Room for Ray's socket paths (at most 107 bytes) below it.
            assert len(str(tmp)) <= 32 and tmp.stat().st_mode & 0o777 == 0o700
            deadline = asyncio.get_running_loop().time() + 10
            while not (tmp / "x").exists():
                assert asyncio.get_running_loop().time() < deadline, "the workload wrote nothing"
                await asyncio.sleep(0.05)
        await host.stop(first.id)
        assert not tmps[0].exists() and tmps[1].exists()
    finally:
        await host.shutdown()
    assert not tmps[1].exists()


def test_a_long_host_tmpdir_is_not_used_for_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's socket paths below a workload's TMPDIR would pass the 107-byte limit.
    monkeypatch.setattr(tempfile, "tempdir", "/" + "x" * 40)
    assert workload_tmp_root() == Path("/tmp")
    assert str(workload_tmp_dir("0123456789abcdef")) == "/tmp/hcw-0123456789abc"
    monkeypatch.setattr(tempfile, "tempdir", "/var/tmp")
    assert workload_tmp_root() == Path("/var/tmp")


@pytest.fixture
def host_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The host's own temp dir for one test, short enough to hold workloads' TMPDIRs."""
    path = tempfile.mkdtemp(prefix="hft-")
    monkeypatch.setattr(tempfile, "tempdir", path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_a_missing_executable_fails_like_a_task_that_cannot_start(
    tmp_path: Path, host_tmp: str
) -> None:
    catalog = ImageCatalog({"broken:1": Image((str(tmp_path / "nothing"),))})
    host = Host(catalog, tmp_path, "example.com")
    with pytest.raises(HostError) as error:
        await host.spawn(proto.VmSpawnRequest(image_ref="broken:1", cores=1))
    assert error.value.text.startswith(
        "node returned failure response: failed to spawn container: failed to start task for "
        "container "
    )
    assert not list((tmp_path / "workloads").iterdir())
    assert os.listdir(host_tmp) == []  # nor its TMPDIR
    await host.shutdown()


def test_the_standin_never_reads_outside_its_logs(tmp_path: Path) -> None:
    host = Host(SLEEP, tmp_path, "example.com")
    (tmp_path / "secret").write_text("no")
    with pytest.raises(HostError, match="no such file or directory"):
        host.logs_file("../secret")
    assert os.path.exists(tmp_path / "secret")
