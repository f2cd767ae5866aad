"""The API's OpenAPI 3.1 document, from the app's route table (``app.ROUTES``) and the pydantic
models."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Operation:
    """What the document says of one route (``app.ROUTES`` pairs each with its handler)."""

    method: str  # lower case
    path: str
    summary: str
    body: type[BaseModel] | None = None  # the request body's model
    status: int = 200  # on success
    authenticated: bool = True  # takes an API key
    query: tuple[str, ...] = ()  # integer query parameters
    idempotency_key: bool = False  # takes an Idempotency-Key header
    streams: bool = False  # may answer text/event-stream
    last_event_id: bool = False  # takes a Last-Event-ID header
    accepted: str | None = None  # may answer 202: what it then says
    documented: bool = True  # False: served, not listed (this document itself)


_ERRORS = {
    "400": "Malformed JSON",
    "401": "Missing or bad API key",
    "403": "Not allowed, or a quota exceeded",
    "404": "Unknown route, or not yours",
    "409": "The session is busy (if_busy: reject)",
    "413": "Body or message too large",
    "422": "Schema violation (the message names the field)",
    "429": "Rate limited, or the session's queue of waiting turns is full (Retry-After)",
    "503": "Capacity exhausted or circuit open (Retry-After)",
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


_EVENTS = {
    "description": "Server-sent events: turn_start, text_delta, tool_use, tool_result, "
    "turn_end, error; each event's id is the session's sequence number",
    "schema": {"type": "string"},
}


def _success(op: Operation) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {}}
    if op.streams:
        content["text/event-stream"] = _EVENTS
    return content


@cache
def openapi_document(operations: tuple[Operation, ...]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        if not op.documented:
            continue
        method, path = op.method, op.path
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": method + "_" + "_".join(p.strip("{}") for p in path.split("/") if p),
            "responses": {
                str(op.status): {"description": "Success", "content": _success(op)},
                **{
                    code: {
                        "description": text,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    }
                    for code, text in _ERRORS.items()
                },
            },
        }
        if op.authenticated:
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        operation["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ] + [
            {
                "name": q,
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
            }
            for q in op.query
        ]
        if op.accepted is not None:
            operation["responses"]["202"] = {
                "description": op.accepted,
                "content": {"application/json": {}},
            }
        if op.last_event_id:
            operation["parameters"].append(
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "the id of the last event received; wins over ?after=",
                    "schema": {"type": "integer", "minimum": 0},
                }
            )
        if op.idempotency_key:
            operation["parameters"].append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            )
        if op.body is not None:
            model = op.body
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                    }
                },
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Hyperfleet API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
