"""Tools an agent may call: built-in (sandboxed shell, workspace files) and custom callables."""

from __future__ import annotations

from .base import Tool, ToolResult
from .builtin import bash_tool, file_tools
from .custom import CustomToolError, load_custom_tool
from .sandbox import Sandbox
from .workspace import PathEscapeError, Workspace

__all__ = [
    "CustomToolError",
    "PathEscapeError",
    "Sandbox",
    "Tool",
    "ToolResult",
    "Workspace",
    "build_tools",
]


def build_tools(names: tuple[str, ...], sandbox: Sandbox, timeout_s: float) -> dict[str, Tool]:
    """The tools an agent spec names, by name, in its order."""
    builtin = {t.name: t for t in [bash_tool(sandbox, timeout_s), *file_tools()]}
    tools: dict[str, Tool] = {}
    for name in names:
        tool = builtin.get(name) or load_custom_tool(name, timeout_s)
        if tool.name in tools:
            raise CustomToolError(f"two tools are named {tool.name!r}")
        tools[tool.name] = tool
    return tools
