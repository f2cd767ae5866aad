"""The coalescing of a call's text deltas: what a streaming client sees, and when."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from actors.events import EventType, TextCoalescer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _coalescer(interval_s: float = 0.1, max_chars: int = 512) -> tuple[TextCoalescer, Clock, list]:
    clock = Clock()
    sent: list[tuple[EventType, dict[str, Any], float]] = []

    async def emit(kind: EventType, data: dict[str, Any]) -> None:
        sent.append((kind, data, clock.now))

    return TextCoalescer(emit, interval_s=interval_s, max_chars=max_chars, clock=clock), clock, sent


def test_the_first_text_goes_at_once_however_soon_the_call_started() -> None:
    async def run() -> list:
        coalescer, clock, sent = _coalescer()
        clock.now += 0.001
        await coalescer.add("Hello")
        return sent

    assert [(k, d["text"]) for k, d, _ in asyncio.run(run())] == [("text_delta", "Hello")]


def test_later_text_is_sent_once_a_window_in_order() -> None:
    async def run() -> list:
        coalescer, clock, sent = _coalescer(interval_s=0.125)
        await coalescer.add("a")
        for token in "bcdefghij":  # a token every 31.25 ms (binary fractions: exact sums)
            clock.now += 0.03125
            await coalescer.add(token)
        await coalescer.flush()
        return sent

    sent = asyncio.run(run())
    assert "".join(d["text"] for _, d, _ in sent) == "abcdefghij"
    assert [d["text"] for _, d, _ in sent] == ["a", "bcde", "fghi", "j"]
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(sent)]
    assert all(gap >= 0.125 for gap in gaps[:-1])


def test_a_full_buffer_is_sent_before_its_window_ends() -> None:
    async def run() -> list:
        coalescer, _clock, sent = _coalescer(interval_s=10.0, max_chars=8)
        await coalescer.add("first")
        await coalescer.add("1234")
        await coalescer.add("5678")
        return sent

    assert [d["text"] for _, d, _ in asyncio.run(run())] == ["first", "12345678"]


def test_a_flush_with_nothing_waiting_sends_nothing_and_keeps_the_first_text_prompt() -> None:
    async def run() -> list:
        coalescer, clock, sent = _coalescer()
        await coalescer.flush()  # a tool_use block before any text
        clock.now += 0.01
        await coalescer.add("after the tool")
        return sent

    assert [d["text"] for _, d, _ in asyncio.run(run())] == ["after the tool"]


def test_empty_text_is_ignored() -> None:
    async def run() -> list:
        coalescer, _, sent = _coalescer()
        await coalescer.add("")
        await coalescer.flush()
        return sent

    assert asyncio.run(run()) == []


def test_waiting_text_goes_at_the_next_event_past_its_window() -> None:
    async def run() -> list:
        coalescer, clock, sent = _coalescer(interval_s=0.125)
        await coalescer.add("I'll")
        clock.now += 0.03125
        await coalescer.add(" read the file.")  # within the window: waits
        await coalescer.tick()  # a tool's input streaming, still within the window
        waiting = [d["text"] for _, d, _ in sent]
        clock.now += 0.125
        await coalescer.tick()  # the window has passed: it goes, without more text
        return [waiting, [d["text"] for _, d, _ in sent]]

    waiting, after = asyncio.run(run())
    assert waiting == ["I'll"]
    assert after == ["I'll", " read the file."]
