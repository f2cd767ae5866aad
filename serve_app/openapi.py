"""The API's OpenAPI 3.1 document, from the route table below and the pydantic models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from actors import AgentSpec

from .models import MessageIn, SpawnRequest, UserCreate, UserPatch

# (method, path, summary, request body model, success status)
ROUTES: tuple[tuple[str, str, str, type[BaseModel] | None, int], ...] = (
    ("get", "/health", "Liveness (no auth)", None, 200),
    ("get", "/ready", "Readiness: control store and session store reachable", None, 200),
    ("post", "/v1/users", "Create a user (admin); returns its first API key once", UserCreate, 201),
    ("get", "/v1/users/{user_id}", "A user (admin, or the user)", None, 200),
    ("patch", "/v1/users/{user_id}", "Change a user's quotas (admin)", UserPatch, 200),
    ("post", "/v1/users/{user_id}/keys", "Another API key, returned once", None, 201),
    ("delete", "/v1/keys/{prefix}", "Revoke a key (admin, or its user)", None, 200),
    ("post", "/v1/agents", "Create an agent from an AgentSpec", AgentSpec, 201),
    ("get", "/v1/agents", "Your agents", None, 200),
    ("post", "/v1/agents/spawn", "Create an agent (the seed's shorthand)", SpawnRequest, 201),
    ("get", "/v1/agents/stats", "Agents, replicas, sessions and nodes", None, 200),
    ("get", "/v1/agents/{agent_id}", "An agent with its replicas", None, 200),
    ("delete", "/v1/agents/{agent_id}", "Drain and remove an agent", None, 200),
    ("post", "/v1/agents/{agent_id}/sessions", "Open a session", None, 201),
    ("get", "/v1/sessions/{session_id}", "A session", None, 200),
    ("delete", "/v1/sessions/{session_id}", "Close a session", None, 200),
    ("get", "/v1/sessions/{session_id}/messages", "The transcript, paginated", None, 200),
    ("post", "/v1/sessions/{session_id}/messages", "Send a message (JSON or SSE)", MessageIn, 200),
    ("get", "/v1/usage", "Your tokens and cost by agent and day", None, 200),
)
_ERRORS = {
    "400": "Malformed JSON",
    "401": "Missing or bad API key",
    "403": "Not allowed, or a quota exceeded",
    "404": "Unknown route, or not yours",
    "409": "The session is busy",
    "413": "Body or message too large",
    "422": "Schema violation (the message names the field)",
    "429": "Rate limited (Retry-After, ratelimit-* headers)",
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


@cache
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, model, status in ROUTES:
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": method + "_" + "_".join(p.strip("{}") for p in path.split("/") if p),
            "responses": {
                str(status): {"description": "Success", "content": {"application/json": {}}},
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
        if path not in ("/health", "/ready"):
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        query = []
        if path.endswith("/messages") and method == "get":
            query = ["after", "limit"]
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
            for q in query
        ]
        if path.endswith("/messages") and method == "post":
            operation["parameters"].append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            )
        if model is not None:
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
