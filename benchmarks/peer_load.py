"""Closed-loop streaming clients for one load, sent three ways: to a Messages API (the emulator
itself, or LiteLLM's proxy in front of it) or to Hyperfleet's sessions.

A Messages API caller holds its conversation and sends the whole of it every turn; the body is
the one Hyperfleet's agent loop sends for the same turn (``actors/loop.py``, ``_params``): the
agent's model and ``max_tokens``, its system prompt as one block and the last user block marked
for the prompt cache, the earlier turns as the agent keeps them (the user's text, the
assistant's text block). The emulator seeds its answer (words and timing) from the model, the
system prompt and the messages, so all three paths get the same answers for the same
conversations. A Hyperfleet client opens a session, sends its messages (``stream: true``, an
idempotency key each, as ``hyperfleet loadtest`` does) and closes it.

Each client sends ``turns_per_session`` messages a conversation, then starts a new one, for as
long as the load lasts; clients start spread over the first half of the warm-up. A turn's
latency runs from sending the request to the stream's end (``message_stop``; Hyperfleet's
``turn_end``, after its commit), its time to first token to the first text delta. A measured
window (``Window``) counts the turns that ended inside it; the clients stop starting turns at
its end and finish the ones in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import aiohttp

from cluster.loadtest.report import percentile
from cluster.loadtest.sse import Event, SseError, SseParser

READ_CHUNK_BYTES = 64 * 1024
TURN_TIMEOUT_S = 120.0
SESSION_TIMEOUT_S = 60.0
FAILED_OPEN_PAUSE_S = 1.0
CONNECTIONS_MAX = 4096
LAG_INTERVAL_S = 0.05  # as hyperfleet loadtest samples its own
CACHE = {"type": "ephemeral"}
ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class Agent:
    """What every path's model calls carry."""

    model: str
    system: str
    max_tokens: int


@dataclass(frozen=True)
class Turn:
    """One message's round trip (``perf_counter`` times)."""

    start: float
    end: float
    ttft_s: float | None
    ok: bool
    error: str = ""  # its kind, then a colon and what the server said
    output_tokens: int = 0
    index: int = 0  # in its conversation


@dataclass
class Window:
    """A path's measured window: the turns that ended in it, and the load generator's own CPU
    seconds and event-loop lag (p99) over it."""

    start: float
    end: float
    turns: list[Turn] = field(default_factory=list)
    open_failures: int = 0
    client_cpu_s: float = 0.0
    client_lag_p99_ms: float = 0.0


def text_of(index: int) -> str:
    return f"Load test message {index}: what is the status of the fleet today?"


def messages_body(agent: Agent, history: list[dict[str, Any]], text: str) -> dict[str, Any]:
    """The Messages API body of Hyperfleet's agent loop for this turn."""
    return {
        "model": agent.model,
        "max_tokens": agent.max_tokens,
        "messages": [
            *history,
            {"role": "user", "content": [{"type": "text", "text": text, "cache_control": CACHE}]},
        ],
        "system": [{"type": "text", "text": agent.system, "cache_control": CACHE}],
        "stream": True,
    }


class Conversation(Protocol):
    async def send(self, text: str) -> Turn: ...


class LoadPath(Protocol):
    """One way of sending the load."""

    @property
    def name(self) -> str: ...

    def conversation(
        self, http: aiohttp.ClientSession, name: str
    ) -> contextlib.AbstractAsyncContextManager[Conversation]: ...


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    parser = SseParser()
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        for event in parser.feed(chunk):
            yield event


def _failed(start: float, error: str, ttft_s: float | None = None) -> Turn:
    return Turn(start, time.perf_counter(), ttft_s, False, error)


class _MessagesConversation:
    def __init__(self, path: MessagesPath, http: aiohttp.ClientSession) -> None:
        self.path = path
        self.http = http
        self.history: list[dict[str, Any]] = []

    async def send(self, text: str) -> Turn:
        body = messages_body(self.path.agent, self.history, text)
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        output_tokens = 0
        try:
            async with self.http.post(
                self.path.url,
                json=body,
                headers=self.path.headers,
                timeout=aiohttp.ClientTimeout(total=TURN_TIMEOUT_S),
            ) as response:
                if response.status != 200:
                    said = (await response.read())[:ERROR_BODY_CHARS].decode(errors="replace")
                    return _failed(start, f"{response.status}: {said}")
                async for event in _events(response):
                    kind = event.data.get("type", event.type)
                    if kind == "content_block_delta":
                        delta = event.data.get("delta") or {}
                        if delta.get("type") == "text_delta":
                            first = first or time.perf_counter()
                            parts.append(str(delta.get("text", "")))
                    elif kind == "message_delta":
                        output_tokens = int((event.data.get("usage") or {}).get("output_tokens", 0))
                    elif kind == "error":
                        return _failed(start, "error event", first)
                    elif kind == "message_stop":
                        break
                else:
                    return _failed(start, "no message_stop", first)
        except (aiohttp.ClientError, TimeoutError, SseError) as e:
            return _failed(start, type(e).__name__, first)
        end = time.perf_counter()
        self.history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": [{"type": "text", "text": "".join(parts)}]},
        ]
        return Turn(start, end, None if first is None else first - start, True, "", output_tokens)


@dataclass(frozen=True)
class MessagesPath:
    """``POST url`` with a Messages body, the caller holding its conversation."""

    name: str
    url: str
    headers: dict[str, str]
    agent: Agent

    @contextlib.asynccontextmanager
    async def conversation(
        self, http: aiohttp.ClientSession, name: str
    ) -> AsyncIterator[Conversation]:
        yield _MessagesConversation(self, http)


class SessionOpenError(Exception):
    """Hyperfleet did not open a session."""


class _Session:
    def __init__(self, path: HyperfleetPath, http: aiohttp.ClientSession, name: str, sid: str):
        self.path = path
        self.http = http
        self.name = name
        self.sid = sid
        self.sent = 0

    async def send(self, text: str) -> Turn:
        headers = {**self.path.headers, "Idempotency-Key": f"peer-{self.name}-{self.sent}"}
        self.sent += 1
        start = time.perf_counter()
        first: float | None = None
        try:
            async with self.http.post(
                f"{self.path.base_url}/v1/sessions/{self.sid}/messages",
                json={"content": text, "stream": True},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=TURN_TIMEOUT_S),
            ) as response:
                if response.status != 200:
                    said = (await response.read())[:ERROR_BODY_CHARS].decode(errors="replace")
                    return _failed(start, f"{response.status}: {said}")
                async for event in _events(response):
                    if event.type == "text_delta":
                        first = first or time.perf_counter()
                    elif event.type == "error":
                        return _failed(start, str(event.data.get("type", "error")), first)
                    elif event.type == "turn_end":
                        usage = event.data.get("usage") or {}
                        end = time.perf_counter()
                        ttft_s = None if first is None else first - start
                        tokens = int(usage.get("output_tokens", 0))
                        return Turn(start, end, ttft_s, True, "", tokens)
                return _failed(start, "no turn_end", first)
        except (aiohttp.ClientError, TimeoutError, SseError) as e:
            return _failed(start, type(e).__name__, first)


@dataclass(frozen=True)
class HyperfleetPath:
    """Sessions of one agent through Hyperfleet's HTTP API."""

    name: str
    base_url: str
    api_key: str
    agent_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @contextlib.asynccontextmanager
    async def conversation(
        self, http: aiohttp.ClientSession, name: str
    ) -> AsyncIterator[Conversation]:
        timeout = aiohttp.ClientTimeout(total=SESSION_TIMEOUT_S)
        try:
            async with http.post(
                f"{self.base_url}/v1/agents/{self.agent_id}/sessions",
                headers=self.headers,
                timeout=timeout,
            ) as response:
                data = await response.json(content_type=None) if response.status == 201 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise SessionOpenError(type(e).__name__) from e
        if not isinstance(data, dict) or "id" not in data:
            raise SessionOpenError(str(response.status))
        try:
            yield _Session(self, http, name, str(data["id"]))
        finally:
            # Closing frees the user's max_sessions; a close that fails idles out on the server.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.delete(
                    f"{self.base_url}/v1/sessions/{data['id']}",
                    headers=self.headers,
                    timeout=timeout,
                ) as closed:
                    await closed.read()


async def probe(path: LoadPath) -> Turn:
    """One turn on ``path``: a path that does not work fails here, not after the whole run.

    Raises:
        SessionOpenError: Hyperfleet opened no session.
    """
    async with aiohttp.ClientSession() as http, path.conversation(http, "probe") as conversation:
        return await conversation.send(text_of(0))


async def _lags_ms(into: list[float]) -> None:
    """How late a short sleep wakes, every ``LAG_INTERVAL_S``, until cancelled."""
    while True:
        before = time.perf_counter()
        await asyncio.sleep(LAG_INTERVAL_S)
        into.append(max(0.0, (time.perf_counter() - before - LAG_INTERVAL_S) * 1000.0))


async def _client(
    path: LoadPath,
    http: aiohttp.ClientSession,
    index: int,
    turns_per_session: int,
    start_at: float,
    window: Window,
) -> None:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    conversation_no = 0
    while time.perf_counter() < window.end:
        name = f"{index}-{conversation_no}"
        conversation_no += 1
        try:
            async with path.conversation(http, name) as conversation:
                for i in range(turns_per_session):
                    if time.perf_counter() >= window.end:
                        break
                    turn = await conversation.send(text_of(i))
                    if window.start <= turn.end <= window.end:
                        window.turns.append(replace(turn, index=i))
        except SessionOpenError:
            if window.start <= time.perf_counter() <= window.end:
                window.open_failures += 1
            await asyncio.sleep(FAILED_OPEN_PAUSE_S)


async def closed_loop(
    path: LoadPath,
    clients: int,
    turns_per_session: int,
    warmup_s: float,
    duration_s: float,
    measured: Callable[[], contextlib.AbstractAsyncContextManager[object]],
) -> Window:
    """``clients`` closed-loop clients on ``path`` for ``warmup_s`` then a measured
    ``duration_s``, over which ``measured()`` is entered (a CPU sampler, say)."""
    t0 = time.perf_counter()
    window = Window(t0 + warmup_s, t0 + warmup_s + duration_s)
    connector = aiohttp.TCPConnector(limit=min(CONNECTIONS_MAX, 2 * clients + 8))
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [
            asyncio.create_task(
                _client(
                    path,
                    http,
                    i,
                    turns_per_session,
                    t0 + warmup_s / 2 * i / clients,
                    window,
                )
            )
            for i in range(clients)
        ]
        try:
            await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
            cpu0_s = time.process_time()
            async with measured():
                lags_ms: list[float] = []
                lag = asyncio.create_task(_lags_ms(lags_ms))
                await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
                lag.cancel()
                window.client_lag_p99_ms = percentile(lags_ms, 99) or 0.0
            window.client_cpu_s = time.process_time() - cpu0_s  # the sampler's own included
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    return window
