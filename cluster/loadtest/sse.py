"""An incremental parser of the API's ``text/event-stream`` answers.

Fed whatever chunks the socket gives, it returns whole events. It does not read line by line
from the response: aiohttp's ``readline`` refuses lines over its buffer, and a ``tool_result``
event can be a long line. One event is bounded by ``MAX_EVENT_BYTES`` all the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_EVENT_BYTES = 16 * 1024 * 1024


class SseError(ValueError):
    """The stream is not the event stream the API writes."""


@dataclass(frozen=True)
class Event:
    type: str
    data: dict[str, Any]
    id: str | None = None  # the ``id:`` field: the event's sequence number in its session


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by ``chunk``.

        Raises:
            SseError: an event over ``MAX_EVENT_BYTES``, or whose data is not a JSON object.
        """
        self._buffer += chunk.replace(b"\r\n", b"\n")
        events = []
        while True:
            block, sep, rest = self._buffer.partition(b"\n\n")
            if not sep:
                break
            self._buffer = rest
            event = _parse(block)
            if event is not None:
                events.append(event)
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise SseError(f"an event over {MAX_EVENT_BYTES} bytes")
        return events


def _parse(block: bytes) -> Event | None:
    kind = "message"
    event_id: str | None = None
    data: list[str] = []
    for raw in block.decode("utf-8", errors="replace").split("\n"):
        if not raw or raw.startswith(":"):
            continue
        name, _, value = raw.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "id":
            event_id = value
        elif name == "data":
            data.append(value)
    if not data:
        return None
    try:
        parsed = json.loads("\n".join(data))
    except ValueError as e:
        raise SseError(f"the data of a {kind!r} event is not JSON") from e
    if not isinstance(parsed, dict):
        raise SseError(f"the data of a {kind!r} event is not a JSON object")
    return Event(kind, parsed, event_id)
