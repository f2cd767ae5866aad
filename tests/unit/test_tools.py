"""Workspace path rules, the file tools and custom tools (no sandbox needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.tools import CustomToolError, PathEscapeError, Sandbox, Workspace, build_tools

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
