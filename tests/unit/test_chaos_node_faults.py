"""The pure parts of the chaos run's node faults: a partition's iptables rules (by cgroup, and by
address without), the connection marks, the cleanup that finds a run's rules by their comment,
the VM images' entrypoint, and the schedule of node faults; and a process tree killed whole."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.chaos import cluster_run
from benchmarks.chaos.faults import InjectionError
from benchmarks.chaos.node_faults import (
    NODE_KINDS,
    PARTITION_MAX_S,
    Endpoint,
    NodeInjector,
    Vm,
    kill_tree,
    node_lasts_s,
    partition,
    partition_rules,
    pids_with,
    tagged_deletions,
)
from benchmarks.chaos.schedule import schedule
from benchmarks.chaos.vm_entry import cgroup2_root, mark_of, mark_rule
from cluster.hypercore_standin import ImageCatalog

WORKER = Endpoint("127.88.3.4", "hf-chaosx/127.88.3.4")
HEAD = Endpoint("127.88.1.2", "hf-chaosx/127.88.1.2")
TAG = "hf-chaosx:partition"


def test_a_partition_by_cgroup_drops_what_each_side_sends_the_other_and_nothing_else() -> None:
    rules = partition_rules(WORKER, HEAD, TAG)
    assert all(r[0] == "OUTPUT" and r[-2:] == ("-j", "DROP") for r in rules)
    assert all(r[r.index("--comment") + 1] == TAG for r in rules)
    worker_sends = [r for r in rules if WORKER.cgroup in r]
    head_sends = [r for r in rules if HEAD.cgroup in r]
    assert len(worker_sends) == len(head_sends) == 2 and len(rules) == 4
    # To the other's address (a connection it opens), and into a connection the other opened.
    assert any("-d" in r and "127.88.1.2/32" in r for r in worker_sends)
    assert any(
        "--mark" in r and f"{mark_of(HEAD.address):#010x}/0xffffffff" in r for r in worker_sends
    )
    assert any("-d" in r and "127.88.3.4/32" in r for r in head_sends)
    assert any(
        "--mark" in r and f"{mark_of(WORKER.address):#010x}/0xffffffff" in r for r in head_sends
    )
    # No rule names a third party: other workers, the driver and the emulator stay reachable.
    assert not any("127.0.0.1" in " ".join(r) for r in rules)


def test_without_cgroups_a_partition_cuts_the_worker_address_both_ways() -> None:
    rules = partition_rules(Endpoint(WORKER.address), HEAD, TAG)
    assert rules == [
        ("INPUT", "-d", "127.88.3.4/32", "-m", "comment", "--comment", TAG, "-j", "DROP"),
        ("INPUT", "-s", "127.88.3.4/32", "-m", "comment", "--comment", TAG, "-j", "DROP"),
    ]
    assert partition_rules(WORKER, Endpoint(HEAD.address), TAG) == rules


def test_connection_marks_are_one_per_address_and_set_by_the_opener() -> None:
    assert mark_of("127.88.1.2") == 0x48460102
    assert mark_of("127.88.255.254") == 0x4846FFFE
    marks = {mark_of(f"127.88.{a}.{b}") for a in range(0, 256, 17) for b in range(1, 255, 13)}
    assert len(marks) == len(range(0, 256, 17)) * len(range(1, 255, 13))
    rule = mark_rule(WORKER.cgroup or "", WORKER.address, "hf-chaosx:mark:127.88.3.4")
    assert rule[0] == "OUTPUT" and rule[rule.index("--path") + 1] == WORKER.cgroup
    assert rule[rule.index("--ctstate") + 1] == "NEW"  # a connection's opener: its first packet
    assert rule[-3:] == ["CONNMARK", "--set-xmark", "0x48460304/0xffffffff"]


def test_cleanup_deletes_the_runs_rules_only_last_first() -> None:
    saved = "\n".join(
        [
            "-P OUTPUT ACCEPT",
            "-N HYPERFLEET-EGRESS",
            "-A OUTPUT -m owner --uid-owner 65533 -j HYPERFLEET-EGRESS",
            "-A OUTPUT -m cgroup --path hf-chaosx/127.88.3.4 -m conntrack --ctstate NEW "
            "-m comment --comment hf-chaosx:mark:127.88.3.4 -j CONNMARK --set-xmark "
            "0x48460304/0xffffffff",
            '-A INPUT -d 127.88.3.4/32 -m comment --comment "hf-chaosx:partition" -j DROP',
            "-A INPUT -d 127.88.9.9/32 -m comment --comment hf-chaosy:partition -j DROP",
            "-A INPUT -d 127.88.9.9/32 -m comment --comment other -j DROP",
        ]
    )
    argvs = tagged_deletions(saved, "hf-chaosx:")
    assert [a[3] for a in argvs] == ["-D", "-D"]
    assert argvs[0][4:] == [
        "INPUT",
        "-d",
        "127.88.3.4/32",
        "-m",
        "comment",
        "--comment",
        "hf-chaosx:partition",
        "-j",
        "DROP",
    ]
    assert argvs[1][4:6] == ["OUTPUT", "-m"] and "hf-chaosx:mark:127.88.3.4" in argvs[1]


async def test_a_partition_is_bounded_before_any_rule_goes_in() -> None:
    vm = Vm("w", "i", "worker", "/nonexistent", WORKER.address, (), None)
    with pytest.raises(ValueError, match="a partition lasts"):
        await partition(vm, vm, PARTITION_MAX_S + 1, TAG)
    with pytest.raises(ValueError, match="a partition lasts"):
        await partition(vm, vm, 0, TAG)


def test_cgroup2_is_found_where_it_is_mounted() -> None:
    hybrid = (
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert cgroup2_root(hybrid) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_root("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == Path("/sys/fs/cgroup")
    assert cgroup2_root("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n") is None


def test_the_vm_images_run_the_node_agent_through_vm_entry_in_their_own_cgroup(
    tmp_path: Path,
) -> None:
    images = ImageCatalog.from_mapping(cluster_run.catalog(tmp_path, "hf-chaosx"))
    for ref in (cluster_run.NODE_IMAGE, cluster_run.HEAD_IMAGE):
        image = images.get(ref)
        assert image is not None
        argv, env = image.render(workload_ip="127.88.7.8", python=sys.executable)
        assert argv[:2] == [sys.executable, str(cluster_run.VM_ENTRY)]
        assert argv[argv.index("--cgroup") + 1] == "hf-chaosx/127.88.7.8"
        assert argv[argv.index("--comment") + 1] == "hf-chaosx:mark:127.88.7.8"
        assert argv[argv.index("--") + 1 :] == [sys.executable, "-m", "cluster.cli", "node"]
        assert "HYPERFLEET_NODE_IP=127.88.7.8" in env


def test_each_node_fault_once_spaced_by_how_long_it_lasts() -> None:
    injector = NodeInjector(lambda _: [], lambda _: None, random.Random(1))
    injector.partition_s = 30.0
    lasts = injector.lasts_s()
    assert lasts["partition"] == 30.0 and lasts["vm-sigterm"] > 5.0  # Stop's 5 s grace
    assert lasts["replica-pause"] == injector.pause_s  # the other kinds' too
    plan = schedule(7, NODE_KINDS, 400.0, 50.0, lasts)
    assert [p.kind for p in plan[:3]] == list(NODE_KINDS)
    assert [p.at_s for p in plan[:3]] == [
        50.0,
        50.0 + lasts["vm-sigterm"] + 50.0,
        106.0 + 0.0 + 50.0,
    ]
    assert plan == schedule(7, NODE_KINDS, 400.0, 50.0, lasts)  # a seed replays
    assert node_lasts_s(40.0, "signal")["vm-sigterm"] > 30.0  # a drain: Ray's 30 s


async def test_a_node_fault_without_the_cluster_is_not_injected() -> None:
    injector = NodeInjector(lambda _: [], lambda _: None, random.Random(1))
    with pytest.raises(InjectionError, match="stand-in cluster"):
        await injector.inject("vm-sigkill")


def test_kill_tree_kills_every_process_with_the_marker_children_included() -> None:
    marker = f"HF_CHAOS_TEST={uuid.uuid4().hex}"
    key, _, value = marker.partition("=")
    # A child in a session of its own: out of its parent's group, as Ray's daemons are.
    child = "import time; time.sleep(60)"
    script = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); "
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, key: value})
    try:
        deadline = time.monotonic() + 20
        while len(pids_with(marker)) < 2:
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        assert kill_tree(marker) == 2
        assert pids_with(marker) == []
    finally:
        parent.kill()
        parent.wait()
