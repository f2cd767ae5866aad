"""Streaming events of a turn, and the coalescing of text deltas.

One Ray object per token would not scale, so text is buffered and sent at most once per
``interval_s`` or when ``max_chars`` are waiting; every other event flushes the buffer first, so
the order seen by a client is the order things happened. The first text of a call goes at once:
coalescing must not delay the time to first token. Waiting text goes out when its window has
passed at the next event of the stream of any kind (``tick``: a tool's input, thinking, a ping)
and when its content block ends, so a text block's tail never waits for a long tool input.

The window is 100 ms: ten updates a second read as smooth text, and at a model's 50 tokens a
second it sends five tokens an event. Each event costs a Ray object from the replica to the
ingress, an HTTP write and the client's parse; at 20 ms (an event a token) the ingress spent
23 ms of CPU a turn, at 100 ms 17 ms (benchmarks/RESULTS.md, 2026-12-02).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

EventType = Literal["turn_start", "text_delta", "tool_use", "tool_result", "turn_end", "error"]
Emit = Callable[[EventType, dict[str, Any]], Awaitable[None]]

COALESCE_INTERVAL_S = 0.1
COALESCE_MAX_CHARS = 512


def event(seq: int | None, kind: EventType, data: dict[str, Any]) -> dict[str, Any]:
    """The wire form of an event: ``{"type", "seq", "data"}``. ``seq`` None: an event of one
    request only (a refusal before its turn began), outside the session's numbered events."""
    return {"type": kind, "seq": seq, "data": data}


class TextCoalescer:
    """Buffers text deltas; emits one ``text_delta`` per window."""

    def __init__(
        self,
        emit: Emit,
        interval_s: float = COALESCE_INTERVAL_S,
        max_chars: int = COALESCE_MAX_CHARS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._interval_s = interval_s
        self._max_chars = max_chars
        self._clock = clock
        self._buffer: list[str] = []
        self._size = 0
        self._last: float | None = None  # when text was last sent; None before the first

    async def add(self, text: str) -> None:
        if not text:
            return
        self._buffer.append(text)
        self._size += len(text)
        if (
            self._last is None
            or self._size >= self._max_chars
            or self._clock() - self._last >= self._interval_s
        ):
            await self.flush()

    async def tick(self) -> None:
        """Another event of the stream: send waiting text whose window has passed."""
        if self._buffer and (self._last is None or self._clock() - self._last >= self._interval_s):
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()
            self._size = 0
            await self._emit("text_delta", {"text": text})
            self._last = self._clock()
