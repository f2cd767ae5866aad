"""What a tool may use, through the real replica host (``build_host``: tools, sandbox, loop,
store) and the emulator's ``[[tool bash {...}]]`` directive: a tool over a limit fails alone, with
a tool error that says which limit, and the replica goes on serving its other sessions. The
egress firewall is the node's real one (iptables), probed only on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from actors import (
    AgentSpec,
    CapacityError,
    NotFoundError,
    RuntimeConfig,
    SessionHost,
    SqliteSessionStore,
)
from actors.actor import build_host
from actors.tools import EgressFirewall

from .conftest import EmulatorServer
from .waiting import processes_with, wait_until_async

HostFactory = Callable[..., SessionHost]
SMALL = {"processes": 32, "memory_mb": 256, "cpu_s": 1, "file_size_mb": 64, "disk_mb": 4}


@pytest.fixture
async def make_host(
    emulator: EmulatorServer, tmp_path: Path, workspaces_root: Path
) -> AsyncIterator[HostFactory]:
    clients: list[anthropic.AsyncAnthropic] = []
    store = SqliteSessionStore(tmp_path / "sessions.db")
    runtime = RuntimeConfig(workspaces=str(workspaces_root))

    def make(firewall: EgressFirewall | None = None, **spec_fields: Any) -> SessionHost:
        spec = AgentSpec(**{"tools": ("bash", "write_file"), **spec_fields})
        client = anthropic.AsyncAnthropic(
            base_url=emulator.base_url, api_key=emulator.api_key, max_retries=2
        )
        clients.append(client)
        agent_id = "lim-" + uuid.uuid4().hex[:8]  # workspaces_root is the test session's
        return build_host(agent_id, spec, runtime, client, store=store, firewall=firewall)

    yield make
    for client in clients:
        await client.close()
    store.close()


def _bash(command: str) -> str:
    return "[[tool bash " + json.dumps({"command": command}) + "]]"


def _text(turn: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in turn["content"])


async def _tool(host: SessionHost, sid: str, directive: str) -> tuple[str, bool]:
    """Runs one tool call in a turn: its whole result (the emulator quotes only its start) and
    whether it is an error."""
    return await _result(host, sid, await host.send(sid, directive))


async def _result(host: SessionHost, sid: str, turn: dict[str, Any]) -> tuple[str, bool]:
    """The result of the one tool call ``turn`` made, from the transcript."""
    page = await host.transcript(sid, after=turn["index"] - 1, limit=1)
    (result,) = [
        block
        for message in page["turns"][0]["messages"]
        if message["role"] == "user" and isinstance(message["content"], list)
        for block in message["content"]
        if block["type"] == "tool_result"
    ]
    return str(result["content"]), bool(result.get("is_error"))


async def _serves_another_session(host: SessionHost) -> None:
    """Another session of the same replica runs a tool at once."""
    other = (await host.open_session("bob"))["id"]
    assert await _tool(host, other, _bash("echo still-serving")) == ("still-serving\n", False)


@pytest.mark.parametrize(
    ("command", "says"),
    [
        pytest.param(
            "head -c 2G /dev/zero > f",
            ["killed by SIGXFSZ, over its file size limit of 4 MiB"],
            id="huge-file",
        ),
        pytest.param(
            "python3 -c 'hog = bytearray(1024 * 1024 * 1024)'", ["MemoryError"], id="memory-hog"
        ),
        pytest.param(
            "while :; do :; done",
            ["killed by SIGXCPU, over its CPU time limit of 1 s"],
            id="cpu-spin",
        ),
        pytest.param(
            "unshare -Ur id", ["unshare failed: No space left on device"], id="user-namespace"
        ),
    ],
)
async def test_a_tool_over_its_limit_fails_alone(
    make_host: HostFactory, command: str, says: list[str]
) -> None:
    host = make_host(tool_limits=SMALL, tool_timeout_s=30)
    sid = (await host.open_session("alice"))["id"]
    text, is_error = await _tool(host, sid, _bash(command))
    assert is_error, text  # a tool error the model reads, not a failed turn
    for phrase in says:
        assert phrase in text, text
    assert "uid=0" not in text
    workspace = host._sessions[sid].workspace.root
    assert sum(f.stat().st_size for f in workspace.iterdir()) <= 4 * 1024 * 1024
    await _serves_another_session(host)


async def test_a_fork_bomb_is_held_to_its_own_process_limit(make_host: HostFactory) -> None:
    host = make_host(tool_limits=SMALL, tool_timeout_s=5)
    sid = (await host.open_session("alice"))["id"]
    # Each copy forks two more and stays: the bomb fills its limit and holds it.
    bomb = "bomb() { bomb | bomb & sleep 29.25; }; bomb"
    running = asyncio.create_task(host.send(sid, _bash(bomb)))
    await wait_until_async(
        lambda: len(processes_with(b"sleep 29.25; }; bomb")) >= 12, "the fork bomb to spread", 10
    )
    # While it runs, every other session's tools still start: the process limit counts only
    # the bomb's own sandbox, not every sandbox of the node's shared sandbox user.
    await _serves_another_session(host)
    text, is_error = await _result(host, sid, await running)
    assert is_error and "Resource temporarily unavailable" in text, text
    assert text.endswith("[timed out after 5 s]"), text
    await wait_until_async(
        lambda: not processes_with(b"sleep 29.25"), "the fork bomb's processes to be gone", 10
    )
    assert (await host.send(sid, _bash("echo after")))["index"] == 2


async def test_the_workspace_disk_quota_stops_a_growing_tool(make_host: HostFactory) -> None:
    host = make_host(tool_limits=SMALL, tool_timeout_s=30)
    sid = (await host.open_session("alice"))["id"]
    # Files under the file size limit, as many as it takes: the quota stops the command.
    many = "for i in $(seq 1000); do head -c 1M /dev/zero > f$i; sleep 0.02; done; echo wrote all"
    text, is_error = await _tool(host, sid, _bash(many))
    assert is_error and "over its disk quota of 4 MiB]" in text, text
    assert "wrote all" not in text
    write = '[[tool write_file {"path": "more.txt", "content": "x"}]]'
    refused, is_error = await _tool(host, sid, write)
    assert is_error and "delete files to make room" in refused, refused
    # Over the quota, a tool may still clean up; then there is room again.
    assert await _tool(host, sid, _bash("rm -f f*; echo cleaned")) == ("cleaned\n", False)
    assert await _tool(host, sid, write) == ("wrote 1 bytes to more.txt", False)
    # The in-memory /tmp is sized, and the rest of the sandbox's root is read-only.
    tmp, _ = await _tool(host, sid, _bash("df -k /tmp | tail -1; touch /x /dev/x; true"))
    assert " 262144 " in tmp and tmp.count("Read-only file system") == 2, tmp
    await _serves_another_session(host)


# Egress: the node's real firewall ----------------------------------------------------------------

# Another node of the cluster, as an address in the node table. No traffic is sent to it: a test
# sends packets to loopback alone, so what a new node changes is read from the rules themselves.
NODE = "198.51.100.7"


@pytest.fixture
def firewall_rules() -> None:
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("the egress firewall needs root and iptables")


def _rejected(tool: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The destinations the node's egress chain rejects, as ``tool -S`` lists them."""
    done = subprocess.run(
        [tool, "-w", "5", "-S", "HYPERFLEET-EGRESS"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return [
        ipaddress.ip_network(line.split()[3])
        for line in done.stdout.splitlines()
        if line.startswith("-A HYPERFLEET-EGRESS -d ") and "-j REJECT" in line
    ]


def _covers(networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in networks)


async def test_egress_never_reaches_the_cluster_and_learns_new_nodes(
    make_host: HostFactory, firewall_rules: None
) -> None:
    node = NODE
    cluster: list[str] = []
    firewall = EgressFirewall(("203.0.113.9/32",), lambda: list(cluster), refresh_s=3_600)
    host = make_host(firewall=firewall, egress=True)
    sid = (await host.open_session("alice"))["id"]
    loopback = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    loopback_port = loopback.sockets[0].getsockname()[1]
    probe = _bash(f"(exec 3<>/dev/tcp/127.0.0.1/{loopback_port}) && echo REACHED-LOOPBACK; true")
    async with loopback:
        out, _ = await _tool(host, sid, probe)
    assert "REACHED" not in out and "Connection refused" in out, out
    # Not a node of the cluster yet: an address like any other on the internet.
    assert not _covers(_rejected("iptables"), node)
    cluster.append(node)  # a node joins the cluster
    await asyncio.to_thread(firewall.refresh)  # what the replica does every egress_refresh_s

    v4, v6 = _rejected("iptables"), _rejected("ip6tables")
    for address in (node, "224.0.0.251", "255.255.255.255", "169.254.169.254", "203.0.113.9"):
        assert _covers(v4, address), (address, v4)  # multicast, broadcast, metadata, operator's
    assert not _covers(v4, "8.8.8.8")
    for address in (
        "ff02::fb",  # multicast
        "fe80::1",  # link-local
        "fd00::1",  # unique local
        "::ffff:10.0.0.1",  # v4-mapped
        "64:ff9b::10.0.0.1",  # NAT64 of a private v4 address
        "2002:a00:1::",  # 6to4 of one
        f"64:ff9b::{node}",  # NAT64 of the cluster's node
    ):
        assert _covers(v6, address), (address, v6)
    assert not _covers(v6, "2001:4860:4860::8888")


# A deleted agent's files ----------------------------------------------------------------------


async def test_a_retired_agent_leaves_no_workspace_behind(
    make_host: HostFactory, workspaces_root: Path
) -> None:
    """What ``DELETE /v1/agents/{id}`` has each replica do (``AgentActor.retire``): drain, then
    remove the agent's workspaces. A request that reaches the replica after that (say, a
    transcript read racing the delete) finds the agent gone and writes nothing back."""
    host = make_host()
    sessions = [(await host.open_session("alice"))["id"] for _ in range(2)]
    for sid in sessions:
        await host.send(sid, _bash("mkdir -p d && echo kept > d/note.txt && chmod 500 d"))
    tree = workspaces_root / host.agent_id
    assert sorted(p.name for p in tree.iterdir()) == sorted(sessions)
    await host.drain(deadline_s=5)
    await host.purge()
    assert not tree.exists()
    with pytest.raises(NotFoundError):
        await host.transcript(sessions[0])
    with pytest.raises(CapacityError):
        await host.open_session("alice")
    assert not tree.exists()
