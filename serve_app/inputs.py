"""What the API reads from a request: its key, its peer's address, a bounded JSON body validated
against a model, and integer query parameters. Each bad input is a 4xx naming what is wrong."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .errors import ApiError

MAX_BODY_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
# ASCII digits only: ``str.isdigit`` also accepts "²" and other digits ``int`` refuses (a 500),
# and a bound on the length keeps ``int`` from parsing thousands of them.
_ASCII_INTEGER = re.compile(r"[0-9]{1,18}")


def _ascii_int(raw: str) -> int | None:
    """``raw`` as a non-negative integer, if it is one written in ASCII digits; else None."""
    return int(raw) if _ASCII_INTEGER.fullmatch(raw) else None


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


async def json_body(request: Request) -> Any:
    declared = _ascii_int(request.headers.get("content-length") or "")
    if declared is not None and declared > MAX_BODY_BYTES:
        raise ApiError(413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from e
    if _depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], body: Any) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "validation_error", f"{where}: {first['msg']}") from e


def key_of(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def peer_of(request: Request) -> str | None:
    """The TCP peer as the server saw it (``client_address.py`` says whom to believe)."""
    return request.client.host if request.client else None


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = _ascii_int(raw)
    if value is None or not low <= value <= high:
        raise ApiError(422, "validation_error", f"{name}: must be an integer in [{low}, {high}]")
    return value
