"""Token counting and prompt-cache accounting.

Tokens are counted with one rule everywhere (a word or a punctuation mark is a token), so the
emulator's numbers are consistent with each other: ``count_tokens`` equals ``input_tokens +
cache_creation_input_tokens + cache_read_input_tokens`` of the same request, and a reply's
``output_tokens`` is the number of tokens generated.

The prompt is laid out in the API's cache order (tools, then system, then messages); a block with
``cache_control`` ends a cacheable prefix. As in the API, the longest cached prefix ending at a
breakpoint is read, the prefixes of later breakpoints are written, and a prefix shorter than the
model's minimum is not cached at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import DEFAULT_CACHE_TTL_S, LONG_CACHE_TTL_S, MAX_CACHE_ENTRIES
from .wire import (
    CacheControl,
    DocumentBlock,
    ImageBlock,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    _Params,
)

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
MESSAGE_OVERHEAD_TOKENS = 4
TOOL_OVERHEAD_TOKENS = 8
IMAGE_TOKENS = 1_600
DOCUMENT_TOKENS = 2_000


def count_text(text: str) -> int:
    return len(TOKEN_RE.findall(text))


@dataclass(frozen=True)
class Segment:
    """A run of prompt tokens; ``breakpoint`` is set when a ``cache_control`` block ends it."""

    tokens: int
    content: bytes
    breakpoint: CacheControl | None


def _block_text(block: object) -> tuple[int, str]:
    if isinstance(block, TextBlock):
        return count_text(block.text), block.text
    if isinstance(block, ToolUseBlock):
        dumped = json.dumps(block.input, sort_keys=True)
        return count_text(block.name) + count_text(dumped), block.name + dumped
    if isinstance(block, ToolResultBlock):
        text = result_text(block)
        return count_text(text) + 2, block.tool_use_id + text
    if isinstance(block, ThinkingBlock):
        return count_text(block.thinking), block.thinking
    if isinstance(block, RedactedThinkingBlock):
        return 16, block.data
    if isinstance(block, ImageBlock):
        return IMAGE_TOKENS, json.dumps(block.source, sort_keys=True)
    if isinstance(block, DocumentBlock):
        return DOCUMENT_TOKENS, json.dumps(block.source, sort_keys=True)
    dumped = json.dumps(getattr(block, "model_dump", lambda: str(block))(), sort_keys=True)
    return count_text(dumped), dumped


def result_text(block: ToolResultBlock) -> str:
    """The text a tool_result carries, whether given as a string or as text blocks."""
    if block.content is None:
        return ""
    if isinstance(block.content, str):
        return block.content
    return "\n".join(str(part.get("text", "")) for part in block.content if isinstance(part, dict))


def segments(request: _Params) -> list[Segment]:
    """The prompt in cache order, one segment per tool, system block and content block."""
    out: list[Segment] = []
    for tool in request.tools or ():
        schema = json.dumps(tool.input_schema or {}, sort_keys=True)
        text = f"{tool.type or ''}{tool.name}{tool.description or ''}{schema}"
        tokens = TOOL_OVERHEAD_TOKENS + count_text(tool.name)
        tokens += count_text(tool.description or "") + count_text(schema)
        out.append(Segment(tokens, text.encode(), tool.cache_control))
    for system in request.system_blocks():
        out.append(Segment(count_text(system.text), system.text.encode(), system.cache_control))
    for message in request.conversation():
        out.append(Segment(MESSAGE_OVERHEAD_TOKENS, message.role.encode(), None))
        for block in message.blocks():
            tokens, text = _block_text(block)
            out.append(Segment(tokens, text.encode(), block.cache_control))
    return out


def count_prompt(request: _Params) -> int:
    return sum(s.tokens for s in segments(request))


@dataclass(frozen=True)
class PromptUsage:
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int


class PromptCache:
    """Which prompt prefixes are cached, per model, with the API's TTLs. Thread-safe, bounded."""

    def __init__(
        self,
        min_tokens: int,
        max_entries: int = MAX_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._min_tokens = min_tokens
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def account(self, model: str, prompt: Iterable[Segment]) -> PromptUsage:
        """Splits a prompt's tokens into uncached, cache-written and cache-read; records writes."""
        digest = hashlib.blake2b(model.encode(), digest_size=16)
        total = 0
        points: list[tuple[bytes, int, float]] = []  # (prefix key, tokens up to it, ttl_s)
        for segment in prompt:
            digest.update(len(segment.content).to_bytes(8, "little"))
            digest.update(segment.content)
            total += segment.tokens
            if segment.breakpoint is not None:
                ttl_s = LONG_CACHE_TTL_S if segment.breakpoint.ttl == "1h" else DEFAULT_CACHE_TTL_S
                points.append((digest.copy().digest(), total, ttl_s))
        cacheable = [p for p in points if p[1] >= self._min_tokens]
        if not cacheable:
            return PromptUsage(total, 0, 0, 0, 0)
        now = self._clock()
        with self._lock:
            read_tokens = 0
            hit_index = -1
            for index in range(len(cacheable) - 1, -1, -1):
                key, tokens, ttl_s = cacheable[index]
                expires = self._entries.get(key)
                if expires is not None and expires > now:
                    read_tokens, hit_index = tokens, index
                    self._entries[key] = now + ttl_s
                    self._entries.move_to_end(key)
                    break
            written_5m = written_1h = 0
            previous = read_tokens
            for key, tokens, ttl_s in cacheable[hit_index + 1 :]:
                if ttl_s == LONG_CACHE_TTL_S:
                    written_1h += tokens - previous
                else:
                    written_5m += tokens - previous
                previous = tokens
                self._entries[key] = now + ttl_s
                self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        created = written_5m + written_1h
        return PromptUsage(
            total - created - read_tokens, created, read_tokens, written_5m, written_1h
        )
