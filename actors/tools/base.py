"""What a tool is to the agent loop: a name, a JSON schema, and a coroutine that never raises.

A failing tool (a bad path, a timeout, a non-zero exit, a bad input) is a result with ``is_error``
that the model reads and reacts to; only a bug in Hyperfleet itself escapes as an exception.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .workspace import Workspace

MAX_RESULT_CHARS = 64 * 1024


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False
    timed_out: bool = False  # ran past its time limit (an error too): counted apart in metrics


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    run: Callable[[dict[str, Any], Workspace], Awaitable[ToolResult]]

    def definition(self) -> dict[str, Any]:
        """The tool as the Messages API takes it."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }


def truncate(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[truncated: {len(text) - limit} more characters]"
