"""The emulator's ASGI application: routing, auth, errors and the two response shapes (JSON, SSE).

It is a bare ASGI callable rather than a Starlette app: the streaming path is the hot loop of every
benchmark (1,000+ concurrent streams on two cores), and owning ``send`` lets a "dropped connection"
fault end a response mid-body the way a failing proxy does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from . import catalog
from .config import MAX_BODY_BYTES, EmulatorConfig
from .reply import Reply, ReplyBlock, plan, seed_of
from .scenario import Scenario, ScenarioPicker
from .tokens import PromptCache, PromptUsage, count_prompt, segments
from .wire import CountTokensRequest, MessagesRequest, RequestError, invalid, parse

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

logger = logging.getLogger(__name__)

MAX_PIECES_PER_DELTA = 32
_ERROR_TEXT = {
    "429": (
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests per "
        "minute. Please retry after the time in the retry-after header.",
    ),
    "529": (529, "overloaded_error", "Overloaded"),
    "500": (500, "api_error", "Internal server error"),
}


class DroppedConnection(Exception):
    """Raised inside the app to make uvicorn cut the connection mid-response (the drop fault)."""


class _QuietDrops(logging.Filter):
    """Keeps injected drops out of uvicorn's error log; real errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection)


def install_log_filter() -> None:
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _json(data) + b"\n\n"


class Stats:
    """Counters served at ``GET /_emulator/stats`` so tests can see what reached the emulator."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.active_streams = 0
        self.peak_streams = 0
        self.completed_streams = 0
        self.started_at = time.time()

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "statuses": dict(self.statuses),
            "faults": dict(self.faults),
            "active_streams": self.active_streams,
            "peak_streams": self.peak_streams,
            "completed_streams": self.completed_streams,
            "uptime_s": round(time.time() - self.started_at, 3),
        }


class Emulator:
    """ASGI app speaking the Anthropic Messages API wire format."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.cache = PromptCache(config.cache_min_tokens)
        self.picker = ScenarioPicker(config)
        self.stats = Stats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request_id = "req_" + uuid.uuid4().hex[:24]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        self.stats.requests[f"{method} {path}"] += 1
        try:
            await self._route(method, path, headers, receive, send, request_id)
        except RequestError as e:
            # Refused input means a client bug worth seeing; injected faults do not pass here.
            logger.warning("%s %s %s -> %d %s", request_id, method, path, e.status, e.message)
            await self._error(send, request_id, e.status, e.error_type, e.message)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        receive: Receive,
        send: Send,
        request_id: str,
    ) -> None:
        if path == "/_emulator/stats" and method == "GET":
            await self._respond(send, request_id, 200, self.stats.to_json())
            return
        routes = {
            "/v1/messages": "POST",
            "/v1/messages/count_tokens": "POST",
            "/v1/models": "GET",
        }
        expected = routes.get(path, "GET" if path.startswith("/v1/models/") else None)
        if expected is None:
            raise RequestError(404, "not_found_error", "Not Found")
        if method != expected:
            raise RequestError(405, "invalid_request_error", f"Method {method} not allowed")
        self._authenticate(headers)
        if path == "/v1/messages":
            await self._messages(headers, await self._body(receive), send, request_id)
        elif path == "/v1/messages/count_tokens":
            body = await self._body(receive)
            request = parse(CountTokensRequest, body)
            self._model(request.model)
            await self._respond(send, request_id, 200, {"input_tokens": count_prompt(request)})
        elif path == "/v1/models":
            await self._respond(send, request_id, 200, self._models())
        else:
            found = catalog.resolve(path.removeprefix("/v1/models/"))
            if found is None:
                raise RequestError(404, "not_found_error", f"model: {path.rsplit('/', 1)[-1]}")
            await self._respond(send, request_id, 200, _model_json(found))

    def _authenticate(self, headers: dict[str, str]) -> None:
        key = headers.get("x-api-key")
        bearer = headers.get("authorization", "")
        if key is None and bearer.lower().startswith("bearer "):
            key = bearer[7:].strip()
        if not key:
            raise RequestError(401, "authentication_error", "x-api-key header is required")
        if self.config.api_key is not None and key != self.config.api_key:
            raise RequestError(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in headers:
            raise invalid("anthropic-version: header is required")

    async def _body(self, receive: Receive) -> object:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "invalid_request_error", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(
                    413, "request_too_large", "Request exceeds the maximum allowed number of bytes."
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"The request body is not valid JSON: {e}") from e

    def _model(self, model: str) -> catalog.ModelInfo:
        found = catalog.resolve(model)
        if found is None:
            raise RequestError(404, "not_found_error", f"model: {model}")
        return found

    def _models(self) -> dict[str, Any]:
        data = [_model_json(m) for m in catalog.CATALOG]
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"],
            "last_id": data[-1]["id"],
        }

    async def _messages(
        self, headers: dict[str, str], body: object, send: Send, request_id: str
    ) -> None:
        request = parse(MessagesRequest, body)
        model = self._model(request.model)
        if request.max_tokens > model.max_output_tokens:
            raise invalid(
                f"max_tokens: {request.max_tokens} > {model.max_output_tokens}, which is the "
                f"maximum allowed number of output tokens for {model.id}"
            )
        assert isinstance(body, dict)
        seed = seed_of(body)
        scenario = self.picker.pick(headers, seed, bool(request.stream))
        if scenario.fault is not None:
            self.stats.faults[scenario.fault] += 1
        if scenario.fault in ("429", "529", "500") or (
            scenario.fault == "midstream" and not request.stream
        ):
            status, kind, text = _ERROR_TEXT[
                scenario.fault if scenario.fault != "midstream" else "500"
            ]
            extra = _retry_headers(scenario) if status in (429, 529) else []
            await self._error(send, request_id, status, kind, text, extra)
            return
        words = (self.config.output_words_min, self.config.output_words_max)
        reply = plan(request, seed, words, scenario.output_tokens)
        usage = self.cache.account(request.model, segments(request))
        message_id = "msg_01" + uuid.uuid4().hex[:22]
        if request.stream:
            window_s = self.config.delta_interval_ms / 1000
            await _Stream(self.stats, send, request_id, scenario, window_s).run(
                message_id, request.model, reply, usage
            )
            return
        due = scenario.token_due_s(reply.output_tokens)
        if due > 0:
            await asyncio.sleep(due)
        payload = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [b.to_json() for b in reply.blocks],
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": _usage(usage, reply.output_tokens),
        }
        if scenario.fault == "drop":
            data = _json(payload)
            await _start(send, 200, request_id, "application/json", len(data))
            await send(
                {"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True}
            )
            raise DroppedConnection(request_id)
        await self._respond(send, request_id, 200, payload)

    async def _respond(self, send: Send, request_id: str, status: int, payload: object) -> None:
        data = _json(payload)
        self.stats.statuses[str(status)] += 1
        await _start(send, status, request_id, "application/json", len(data))
        await send({"type": "http.response.body", "body": data})

    async def _error(
        self,
        send: Send,
        request_id: str,
        status: int,
        error_type: str,
        message: str,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        payload = {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id,
        }
        data = _json(payload)
        self.stats.statuses[str(status)] += 1
        await _start(send, status, request_id, "application/json", len(data), extra_headers)
        await send({"type": "http.response.body", "body": data})


def _model_json(m: catalog.ModelInfo) -> dict[str, Any]:
    return {"type": "model", "id": m.id, "display_name": m.display_name, "created_at": m.created_at}


def _retry_headers(scenario: Scenario) -> list[tuple[bytes, bytes]]:
    seconds = -(-scenario.retry_after_ms // 1000)
    return [
        (b"retry-after", str(seconds).encode()),
        (b"retry-after-ms", str(scenario.retry_after_ms).encode()),
    ]


async def _start(
    send: Send,
    status: int,
    request_id: str,
    content_type: str,
    length: int | None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"request-id", request_id.encode()),
        (b"anthropic-organization-id", b"00000000-0000-4000-8000-000000000000"),
    ]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    else:
        headers.append((b"cache-control", b"no-cache"))
    headers.extend(extra_headers or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})


def _usage(usage: PromptUsage, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.ephemeral_5m_input_tokens,
            "ephemeral_1h_input_tokens": usage.ephemeral_1h_input_tokens,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


class _Stream:
    """Writes one reply as the API's SSE event sequence, paced by the scenario's latency model."""

    def __init__(
        self, stats: Stats, send: Send, request_id: str, scenario: Scenario, window_s: float
    ) -> None:
        self.window_s = window_s
        self.stats = stats
        self.send = send
        self.request_id = request_id
        self.scenario = scenario
        self.events = 0
        self.struck = False
        self.t0 = 0.0
        self.tokens = 0

    async def run(self, message_id: str, model: str, reply: Reply, usage: PromptUsage) -> None:
        self.stats.statuses["200"] += 1
        self.stats.active_streams += 1
        self.stats.peak_streams = max(self.stats.peak_streams, self.stats.active_streams)
        try:
            if await self._write(message_id, model, reply, usage):
                self.stats.completed_streams += 1
        finally:
            self.stats.active_streams -= 1

    async def _write(self, message_id: str, model: str, reply: Reply, usage: PromptUsage) -> bool:
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        await _start(self.send, 200, self.request_id, "text/event-stream; charset=utf-8", None)
        start_usage = _usage(usage, 1)
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        if not await self._emit("message_start", {"type": "message_start", "message": message}):
            return False
        for index, block in enumerate(reply.blocks):
            if not await self._block(index, block):
                return False
        final = _usage(usage, reply.output_tokens)
        final.pop("cache_creation")
        final.pop("service_tier")
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
            "usage": final,
        }
        if not await self._emit("message_delta", delta):
            return False
        if self.scenario.fault is not None and not self.struck:
            await self._strike()
            return False
        await self.send(
            {"type": "http.response.body", "body": _sse("message_stop", {"type": "message_stop"})}
        )
        return True

    async def _block(self, index: int, block: ReplyBlock) -> bool:
        start: dict[str, Any]
        if block.kind == "text":
            start, delta_type, field = {"type": "text", "text": ""}, "text_delta", "text"
        elif block.kind == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            delta_type, field = "thinking_delta", "thinking"
        else:
            start = {"type": "tool_use", "id": block.tool_id, "name": block.tool_name, "input": {}}
            delta_type, field = "input_json_delta", "partial_json"
            self.tokens += block.start_tokens
        event = {"type": "content_block_start", "index": index, "content_block": start}
        if not await self._emit("content_block_start", event):
            return False
        if index == 0 and not await self._emit("ping", {"type": "ping"}):
            return False
        if block.kind == "tool_use" and not await self._delta(index, delta_type, field, ""):
            return False
        pieces = block.pieces
        i = 0
        loop = asyncio.get_running_loop()
        window = self.window_s
        while i < len(pieces):
            due = self.t0 + self.scenario.token_due_s(self.tokens)
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
                now = loop.time()
            chunk: list[str] = []
            while i < len(pieces) and len(chunk) < MAX_PIECES_PER_DELTA:
                if self.t0 + self.scenario.token_due_s(self.tokens) > now + window and chunk:
                    break
                piece, tokens = pieces[i]
                chunk.append(piece)
                self.tokens += tokens
                i += 1
            if not await self._delta(index, delta_type, field, "".join(chunk)):
                return False
        if block.kind == "thinking":
            signature = {"type": "signature_delta", "signature": block.signature}
            event = {"type": "content_block_delta", "index": index, "delta": signature}
            if not await self._emit("content_block_delta", event):
                return False
        return await self._emit(
            "content_block_stop", {"type": "content_block_stop", "index": index}
        )

    async def _delta(self, index: int, delta_type: str, field: str, text: str) -> bool:
        event = {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": delta_type, field: text},
        }
        return await self._emit("content_block_delta", event)

    async def _emit(self, name: str, data: object) -> bool:
        """Sends one event; False once an injected fault has ended the stream."""
        await self.send({"type": "http.response.body", "body": _sse(name, data), "more_body": True})
        self.events += 1
        if self.scenario.fault is not None and self.events >= self.scenario.fault_after_events:
            await self._strike()
            return False
        return True

    async def _strike(self) -> None:
        self.struck = True
        if self.scenario.fault == "drop":
            raise DroppedConnection(self.request_id)
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        await self.send({"type": "http.response.body", "body": _sse("error", error)})
