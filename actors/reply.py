"""A model reply, accumulated from the Messages API's raw stream events into plain dicts.

The loop streams with ``messages.create(stream=True)`` rather than the SDK's ``messages.stream``
helper. The helper keeps a pydantic snapshot of the message and builds derived events for every
delta; the loop needs neither (it stores blocks as JSON dicts and forwards only text). On this
project's 2-core machine a short reply from the emulator cost 5.5-6.5 ms of CPU through the helper
against 3.0-3.3 ms as a raw stream, and a real reply, with a delta every few tokens, saves more.
This module does what the helper's ``accumulate_event`` does, for the fields the loop reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hyperfleet.errors import UpstreamError

from .pricing import Usage


class IncompleteReplyError(Exception):
    """The stream ended before ``message_stop``: a broken stream, like a dropped connection."""


@dataclass(frozen=True)
class ModelReply:
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: Usage


class ReplyAccumulator:
    """Feeds on raw stream events (``add``) and gives the finished reply (``result``)."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.started = False  # a content block began: output may have been shown
        self._text: dict[int, list[str]] = {}  # text or thinking parts, by block index
        self._json: dict[int, list[str]] = {}  # tool input JSON parts, by block index
        self._usage: dict[str, int] = {}
        self._one_hour = 0
        self._stop_reason: str | None = None
        self._stopped = False

    def add(self, event: Any) -> str | None:
        """Takes one event; returns the text it adds to a text block, if any."""
        kind = event.type
        if kind == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta":
                self._text.setdefault(event.index, []).append(delta.text)
                return str(delta.text)
            if delta.type == "input_json_delta":
                self._json.setdefault(event.index, []).append(delta.partial_json)
            elif delta.type == "thinking_delta":
                self._text.setdefault(event.index, []).append(delta.thinking)
            elif delta.type == "signature_delta":
                self.content[event.index]["signature"] = delta.signature
            elif delta.type == "citations_delta":
                citation = delta.citation.model_dump(mode="json", exclude_none=True)
                self.content[event.index].setdefault("citations", []).append(citation)
        elif kind == "content_block_start":
            self.started = True
            block = event.content_block.model_dump(mode="json", exclude_none=True)
            self.content.append(block)
        elif kind == "content_block_stop":
            self._finish_block(event.index)
        elif kind == "message_start":
            usage = event.message.usage
            self._usage = _counts(usage, start=True)
            creation = getattr(usage, "cache_creation", None)
            self._one_hour = getattr(creation, "ephemeral_1h_input_tokens", 0) or 0
        elif kind == "message_delta":
            self._stop_reason = event.delta.stop_reason
            # Counts on message_delta are cumulative; absent ones keep message_start's value.
            self._usage.update(_counts(event.usage, start=False))
        elif kind == "message_stop":
            self._stopped = True
        return None

    def _finish_block(self, index: int) -> None:
        block = self.content[index]
        parts = self._text.pop(index, None)
        if parts is not None:
            field = "thinking" if block.get("type") == "thinking" else "text"
            block[field] = block.get(field, "") + "".join(parts)
        pieces = self._json.pop(index, None)
        if pieces:
            try:
                block["input"] = json.loads("".join(pieces))
            except ValueError as e:
                raise UpstreamError(f"the model sent tool input that is not JSON: {e}") from e

    def shown_text(self) -> list[dict[str, Any]]:
        """The text blocks streamed so far, the one in progress included: what an interrupted
        call had said. Thinking and unfinished tool calls are left out (neither can be sent back
        to the model as they stand)."""
        blocks = []
        for index, block in enumerate(self.content):
            if block.get("type") != "text":
                continue
            text = block.get("text", "") + "".join(self._text.get(index, ()))
            if text.strip():
                blocks.append({"type": "text", "text": text})
        return blocks

    def shown_chars(self) -> int:
        """How many characters of text and tool input the stream has sent."""
        done = sum(len(b.get("text", "")) for b in self.content)
        pending = sum(
            len(p) for parts in (*self._text.values(), *self._json.values()) for p in parts
        )
        return done + pending

    def estimate_output(self, tokens: int) -> None:
        """Counts ``tokens`` of output for a stream cut off before it reported its own."""
        self._usage["output_tokens"] = tokens

    def result(self) -> ModelReply:
        """The reply; raises ``IncompleteReplyError`` if the stream stopped short."""
        if not self._stopped:
            raise IncompleteReplyError("the model stream ended before message_stop")
        for index in sorted({*self._text, *self._json}):
            self._finish_block(index)
        return ModelReply(self.content, self._stop_reason, self.usage())

    def usage(self) -> Usage:
        """The tokens the stream has reported so far: all of them once it finished; of a stream
        that broke, what its ``message_start`` (the input) and last ``message_delta`` counted."""
        return Usage(
            self._usage.get("input_tokens", 0),
            self._usage.get("output_tokens", 0),
            self._usage.get("cache_read_input_tokens", 0),
            self._usage.get("cache_creation_input_tokens", 0),
            self._one_hour,
        )


_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def _counts(usage: Any, start: bool) -> dict[str, int]:
    counts = {}
    for field in _COUNTS:
        value = getattr(usage, field, None)
        if value is not None:
            counts[field] = int(value)
        elif start:
            counts[field] = 0
    return counts
