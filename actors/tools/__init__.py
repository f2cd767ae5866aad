"""Tools an agent may call: built-in (sandboxed shell, workspace files) and custom callables."""

from __future__ import annotations

from .base import Tool, ToolResult
from .builtin import bash_tool, file_tools
from .custom import CustomToolError, load_custom_tool
from .egress import EgressFirewall, EgressUnavailable
from .sandbox import Sandbox, SandboxLimits
from .workspace import PathEscapeError, Workspace

__all__ = [
    "CustomToolError",
    "EgressFirewall",
    "EgressUnavailable",
    "PathEscapeError",
    "Sandbox",
    "SandboxLimits",
    "Tool",
    "ToolResult",
    "Workspace",
    "build_tools",
    "check_custom_tools",
]


def check_custom_tools(names: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    """Custom tools run platform code in the replica, outside the sandbox: only those the
    operator listed (``RuntimeConfig.custom_tools``) may be named by an agent."""
    builtin = {"bash", "read_file", "write_file", "list_files"}
    refused = [n for n in names if n not in builtin and n not in allowed]
    if refused:
        raise CustomToolError(
            f"custom tools {', '.join(refused)} are not enabled on this platform"
            + (f" (enabled: {', '.join(allowed)})" if allowed else "")
        )


def build_tools(
    names: tuple[str, ...], sandbox: Sandbox, timeout_s: float, allowed: tuple[str, ...] = ()
) -> dict[str, Tool]:
    """The tools an agent spec names, by name, in its order."""
    check_custom_tools(names, allowed)
    builtin = {t.name: t for t in [bash_tool(sandbox, timeout_s), *file_tools()]}
    tools: dict[str, Tool] = {}
    for name in names:
        tool = builtin.get(name) or load_custom_tool(name, timeout_s)
        if tool.name in tools:
            raise CustomToolError(f"two tools are named {tool.name!r}")
        tools[tool.name] = tool
    return tools
