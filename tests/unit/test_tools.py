"""Workspace path rules, the file tools and custom tools (no sandbox needed)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from actors.tools import CustomToolError, PathEscapeError, Sandbox, Workspace, build_tools
from actors.tools.egress import blocked_destinations, rules

FIXTURE = "tests.unit.fixtures.custom_tools"


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "agent" / "session")
    ws.create()
    return ws


def test_paths_stay_inside(workspace: Workspace, tmp_path: Path) -> None:
    assert workspace.resolve("a/b.txt") == (workspace.root / "a/b.txt").resolve()
    assert workspace.resolve("/workspace/x") == (workspace.root / "x").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x", "bad\x00name"):
        with pytest.raises(PathEscapeError):
            workspace.resolve(bad)
    os.symlink("/etc", workspace.root / "etc-link")
    os.symlink("/etc/hostname", workspace.root / "host-link")
    for linked in ("etc-link/passwd", "host-link"):
        with pytest.raises(PathEscapeError):
            workspace.read(linked, 100)
        with pytest.raises(PathEscapeError):
            workspace.write(linked, b"x")
    os.mkfifo(workspace.root / "fifo")
    with pytest.raises(PathEscapeError, match="not a regular file"):
        workspace.read("fifo", 100)  # refused at once, not blocking the event loop
    os.symlink("loop-b", workspace.root / "loop-a")
    os.symlink("loop-a", workspace.root / "loop-b")
    with pytest.raises(PathEscapeError):
        workspace.read("loop-a", 100)


async def test_file_tools_round_trip(workspace: Workspace) -> None:
    tools = build_tools(("read_file", "write_file", "list_files"), Sandbox(), 5)
    wrote = await tools["write_file"].run({"path": "d/f.txt", "content": "héllo"}, workspace)
    assert not wrote.is_error and "wrote 6 bytes" in wrote.content
    read = await tools["read_file"].run({"path": "d/f.txt"}, workspace)
    assert (read.content, read.is_error) == ("héllo", False)
    listing = await tools["list_files"].run({}, workspace)
    assert listing.content == "d/"
    assert (await tools["list_files"].run({"path": "d"}, workspace)).content == "f.txt\t6"


async def test_file_tool_errors_are_results(workspace: Workspace) -> None:
    tools = build_tools(("read_file", "write_file"), Sandbox(), 5)
    escape = await tools["write_file"].run({"path": "../evil", "content": "x"}, workspace)
    assert escape.is_error and "outside the session workspace" in escape.content
    assert not (workspace.root.parent / "evil").exists()
    missing = await tools["read_file"].run({"path": "nope"}, workspace)
    assert missing.is_error
    bad_input = await tools["read_file"].run({"path": 3}, workspace)
    assert bad_input.is_error and "must be a string" in bad_input.content
    (workspace.root / "bin").write_bytes(b"\xff\xfe")
    assert "not a UTF-8" in (await tools["read_file"].run({"path": "bin"}, workspace)).content
    huge = await tools["write_file"].run({"path": "h", "content": "x" * 2_000_000}, workspace)
    assert huge.is_error and "limit" in huge.content
    with (workspace.root / "sparse").open("wb") as f:
        f.truncate(10 * 1024**3)  # 10 GiB of holes: read_file must read only its cap
    big = await tools["read_file"].run({"path": "sparse"}, workspace)
    assert big.content.endswith("[truncated at 256 KiB]")


async def test_custom_tool_schema_and_calls(workspace: Workspace) -> None:
    refs = (f"{FIXTURE}:add", f"{FIXTURE}:shout", f"{FIXTURE}:explode")
    tools = build_tools(refs, Sandbox(), 5, allowed=refs)
    add = tools["add"]
    assert add.description == "Add two integers."
    assert add.input_schema["required"] == ["a"]
    assert add.input_schema["properties"]["a"]["type"] == "integer"
    assert (await add.run({"a": 40}, workspace)).content == "42"
    invalid = await add.run({"a": "many"}, workspace)
    assert invalid.is_error and "invalid input" in invalid.content
    assert tools["shout"].input_schema["properties"]["mode"]["enum"] == ["upper", "lower"]
    assert (await tools["shout"].run({"text": "Hi", "mode": "lower"}, workspace)).content == "hi"
    boom = await tools["explode"].run({"reason": "kaput"}, workspace)
    assert boom.is_error and boom.content == "RuntimeError: kaput"


def test_custom_tools_that_cannot_load_are_explained() -> None:
    with pytest.raises(CustomToolError, match="cannot be loaded"):
        build_tools(("no.such.module:f",), Sandbox(), 5, allowed=("no.such.module:f",))
    untyped = f"{FIXTURE}:untyped"
    with pytest.raises(CustomToolError, match="has no annotation"):
        build_tools((untyped,), Sandbox(), 5, allowed=(untyped,))


def test_only_operator_enabled_custom_tools_load() -> None:
    # Naming any importable function would run platform code outside the sandbox.
    with pytest.raises(CustomToolError, match="not enabled on this platform"):
        build_tools(("os:system",), Sandbox(), 5)
    with pytest.raises(CustomToolError, match=r"enabled: .*:add"):
        build_tools(("os:system",), Sandbox(), 5, allowed=(f"{FIXTURE}:add",))


async def test_bash_without_bubblewrap_refuses(workspace: Workspace) -> None:
    sandbox = Sandbox()
    sandbox.bwrap = None
    tools = build_tools(("bash",), sandbox, 5)
    result = await tools["bash"].run({"command": "echo hi"}, workspace)
    assert result.is_error and "bubblewrap" in result.content


_REMOVE_AS_OWNER = """
import os, pathlib, sys
from actors.tools.workspace import remove_tree
agent = pathlib.Path(sys.argv[1]) / "agent"
deep = agent / "session" / "d" / "e"
deep.mkdir(parents=True)
(deep / "f").write_text("kept")
os.symlink(sys.argv[2], agent / "session" / "link")
os.chmod(deep, 0o500)
os.chmod(deep.parent, 0o000)
remove_tree(agent)
print("left:", agent.exists())
"""


def test_a_workspace_tree_is_removed_even_where_a_tool_made_it_read_only(tmp_path: Path) -> None:
    """A replica that is not root runs its tools as its own user: what they leave read-only it
    must still remove (as the tree's owner, without root's bypass of permissions)."""
    base = Path(tempfile.mkdtemp(prefix="hf-rm-"))
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    argv = [sys.executable, "-c", _REMOVE_AS_OWNER, str(base), str(outside)]
    if os.geteuid() == 0:
        base.chmod(0o777)  # the owner below is nobody, not root
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("needs setpriv to run as an unprivileged owner")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "left: False"
        assert (outside.stat().st_mode & 0o777) == 0o755  # a link's target is left alone
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_egress_chain_covers_every_form_of_a_blocked_address() -> None:
    v4, v6 = blocked_destinations(["192.0.2.2", "fe80::1%eth0", "203.0.113.0/24", "10.1.2.3"])
    v4_nets = [ipaddress.ip_network(n) for n in v4]
    v6_nets = [ipaddress.ip_network(n) for n in v6]

    def covered(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in n for n in (v4_nets if ip.version == 4 else v6_nets))

    for address in (
        "192.0.2.2",
        "203.0.113.77",
        "224.0.0.251",
        "239.255.255.250",
        "255.255.255.255",
    ):
        assert covered(address), address
    for address in ("ff02::1", "fe80::2", "fd12::1", "::ffff:8.8.8.8", "64:ff9b::203.0.113.77"):
        assert covered(address), address
    assert covered("2002:cb00:714d::1")  # 6to4 of 203.0.113.77
    assert covered("64:ff9b::10.9.9.9") and covered("2002:a09:909::")  # of 10/8
    for address in ("8.8.8.8", "192.0.2.3", "2001:4860:4860::8888", "64:ff9b::8.8.8.8"):
        assert not covered(address), address
    assert "10.1.2.3/32" not in v4  # inside 10.0.0.0/8: collapsed
    table = rules(v4)
    assert table.startswith("*filter\n:HYPERFLEET-EGRESS - [0:0]\n")  # declared: emptied first
    assert "-A HYPERFLEET-EGRESS -d 203.0.113.0/24 -j REJECT\n" in table
    assert table.endswith("COMMIT\n")
