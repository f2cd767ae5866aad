"""Custom tools: a typed Python callable named ``module:function``.

Its JSON schema comes from its signature through pydantic (every parameter needs an annotation),
its description from its docstring. Input is validated against the same model before the call; a
validation error or an exception from the function is a result with ``is_error``. Custom tools are
platform code installed on the nodes, so they run in the replica process, not in the sandbox.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from typing import Any, get_type_hints

from pydantic import BaseModel, ValidationError, create_model

from .base import Tool, ToolResult, truncate
from .workspace import Workspace


class CustomToolError(ValueError):
    """A custom tool that cannot be loaded; the message says why."""


def load_custom_tool(ref: str, timeout_s: float) -> Tool:
    module_name, _, attr = ref.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CustomToolError(f"custom tool {ref!r} cannot be loaded: {e}") from e
    if not callable(function):
        raise CustomToolError(f"custom tool {ref!r} is not callable")
    try:
        model = _input_model(ref, function)
        schema = model.model_json_schema()
    except (TypeError, ValueError) as e:  # pydantic's schema errors are TypeErrors/ValueErrors
        if isinstance(e, CustomToolError):
            raise
        raise CustomToolError(f"custom tool {ref!r} has no JSON schema: {e}") from e
    schema.pop("title", None)
    description = (inspect.getdoc(function) or f"The {attr} tool.").split("\n\n")[0]

    async def run(tool_input: dict[str, Any], workspace: Workspace) -> ToolResult:
        try:
            arguments = model.model_validate(tool_input)
        except ValidationError as e:
            return ToolResult(f"invalid input: {e}", is_error=True)
        kwargs = {name: getattr(arguments, name) for name in type(arguments).model_fields}
        try:
            if inspect.iscoroutinefunction(function):
                result = await asyncio.wait_for(function(**kwargs), timeout_s)
            else:
                result = await asyncio.wait_for(asyncio.to_thread(function, **kwargs), timeout_s)
        except TimeoutError:
            return ToolResult(f"{attr} timed out after {timeout_s:g} s", True, timed_out=True)
        except Exception as e:  # noqa: BLE001 - any failure of tool code is the model's to read
            return ToolResult(f"{type(e).__name__}: {e}", is_error=True)
        text = result if isinstance(result, str) else json.dumps(result, default=str)
        return ToolResult(truncate(text))

    return Tool(attr, description, schema, run)


def _input_model(ref: str, function: Any) -> type[BaseModel]:
    signature = inspect.signature(function)
    try:
        hints = get_type_hints(function)
    except NameError as e:
        raise CustomToolError(f"custom tool {ref!r} has an unresolvable annotation: {e}") from e
    fields: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise CustomToolError(f"custom tool {ref!r} takes *args or **kwargs")
        if name not in hints:
            raise CustomToolError(f"custom tool {ref!r}: parameter {name!r} has no annotation")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (hints[name], default)
    model: type[BaseModel] = create_model(
        f"{ref.replace(':', '_').replace('.', '_')}_input", **fields
    )
    return model
