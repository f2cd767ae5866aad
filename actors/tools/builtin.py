"""The built-in tools: ``bash`` in the sandbox; ``read_file``, ``write_file`` and ``list_files``
confined to the workspace by path resolution."""

from __future__ import annotations

import signal
from typing import Any

from .base import Tool, ToolResult
from .sandbox import Sandbox, SandboxUnavailable
from .workspace import MIB, PathEscapeError, Workspace

MAX_READ_BYTES = 256 * 1024
MAX_WRITE_BYTES = 1024 * 1024
MAX_LIST_ENTRIES = 1000


def _string_input(tool_input: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = tool_input.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"input {name!r} must be a string")
    return value


def _exit_note(exit_code: int, sandbox: Sandbox, workspace: Workspace) -> str:
    """What a non-zero exit says, naming the limit that killed the command when one did (bwrap
    exits with 128 + the signal that ended the command)."""
    limits = {
        signal.SIGXCPU: f"its CPU time limit of {sandbox.limits.cpu_s} s",
        signal.SIGXFSZ: f"its file size limit of {sandbox.file_size_limit(workspace) / MIB:g} MiB",
    }
    signals = {int(s): s for s in limits}
    killed_by = signals.get(exit_code - 128)
    if killed_by is None:
        return f"[exit code {exit_code}]"
    return f"[exit code {exit_code}: killed by {killed_by.name}, over {limits[killed_by]}]"


def bash_tool(sandbox: Sandbox, timeout_s: float) -> Tool:
    async def run(tool_input: dict[str, Any], workspace: Workspace) -> ToolResult:
        try:
            command = _string_input(tool_input, "command")
            assert command is not None
            done = await sandbox.run(workspace, ["/bin/bash", "-c", command], timeout_s)
        except (ValueError, SandboxUnavailable) as e:
            return ToolResult(str(e), is_error=True)
        note = "\n[output truncated]" if done.truncated else ""
        if done.stopped is not None:
            return ToolResult(f"{done.output}{note}\n[stopped: {done.stopped}]", True)
        if done.exit_code is None:
            message = f"{done.output}{note}\n[timed out after {timeout_s:g} s]"
            return ToolResult(message, is_error=True, timed_out=True)
        if done.exit_code != 0:
            exit_note = _exit_note(done.exit_code, sandbox, workspace)
            return ToolResult(f"{done.output}{note}\n{exit_note}", True)
        return ToolResult(done.output + note)

    return Tool(
        "bash",
        f"Run a bash command in the session workspace (no stdin, {timeout_s:g} s timeout, "
        "output capped at 64 KiB).",
        {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The command to run"}},
            "required": ["command"],
        },
        run,
    )


async def _read_file(tool_input: dict[str, Any], workspace: Workspace) -> ToolResult:
    try:
        path = _string_input(tool_input, "path") or ""
        data = workspace.read(path, MAX_READ_BYTES + 1)
    except (PathEscapeError, ValueError, OSError) as e:
        return ToolResult(str(e), is_error=True)
    try:
        text = data[:MAX_READ_BYTES].decode("utf-8")
    except UnicodeDecodeError:
        return ToolResult(f"{path} is not a UTF-8 text file", is_error=True)
    return ToolResult(text + ("\n[truncated at 256 KiB]" if len(data) > MAX_READ_BYTES else ""))


async def _write_file(tool_input: dict[str, Any], workspace: Workspace) -> ToolResult:
    try:
        path = _string_input(tool_input, "path") or ""
        data = (_string_input(tool_input, "content") or "").encode()
        if len(data) > MAX_WRITE_BYTES:
            raise ValueError(f"content is {len(data)} bytes, over the {MAX_WRITE_BYTES} limit")
        workspace.write(path, data)
    except (PathEscapeError, ValueError, OSError) as e:
        return ToolResult(str(e), is_error=True)
    return ToolResult(f"wrote {len(data)} bytes to {'/'.join(workspace.parts(path))}")


async def _list_files(tool_input: dict[str, Any], workspace: Workspace) -> ToolResult:
    try:
        entries = workspace.list(_string_input(tool_input, "path", required=False) or ".")
    except (PathEscapeError, ValueError, OSError) as e:
        return ToolResult(str(e), is_error=True)
    lines = [
        f"{name}/" if is_dir else f"{name}\t{size}"
        for name, is_dir, size in entries[:MAX_LIST_ENTRIES]
    ]
    if len(entries) > MAX_LIST_ENTRIES:
        lines.append(f"[{len(entries) - MAX_LIST_ENTRIES} more entries]")
    return ToolResult("\n".join(lines) if lines else "(empty)")


def _path_schema(description: str, required: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"path": {"type": "string", "description": description}},
    }
    if required:
        schema["required"] = ["path"]
    return schema


def file_tools() -> list[Tool]:
    write_schema = _path_schema("File path, relative to the workspace")
    write_schema["properties"]["content"] = {"type": "string"}
    write_schema["required"] = ["path", "content"]
    return [
        Tool(
            "read_file",
            "Read a UTF-8 text file from the session workspace (up to 256 KiB).",
            _path_schema("File path, relative to the workspace"),
            _read_file,
        ),
        Tool(
            "write_file",
            "Write a text file in the session workspace, creating directories (up to 1 MiB).",
            write_schema,
            _write_file,
        ),
        Tool(
            "list_files",
            "List a directory of the session workspace: names, with sizes for files.",
            _path_schema("Directory, relative to the workspace (default: its root)", False),
            _list_files,
        ),
    ]
