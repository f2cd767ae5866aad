"""What the emulated model answers: deterministic, seeded from the request, driven by directives.

- Plain text: an echo of the start of the last user text, then seeded filler words; its length is
  drawn from the seed (or forced by ``x-emulator-output-tokens``).
- ``[[tool NAME {json input}]]`` in the last user turn (its text, or the text of its tool results),
  with NAME among the offered tools: a ``tool_use`` block per directive, ``stop_reason: tool_use``.
  A directive naming a tool that was not offered gets a text answer saying so.
- A last user turn of ``tool_result`` blocks without directives: text quoting each result.
- ``thinking: {type: enabled}``: a thinking block with a signature comes first.
Then ``max_tokens`` and ``stop_sequences`` cut the planned reply exactly as the API would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .tokens import count_text, result_text
from .wire import MessagesRequest, TextBlock, ToolResultBlock, ToolUseBlock

PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+$")
DIRECTIVE_RE = re.compile(r"\[\[tool\s+([A-Za-z0-9_-]{1,128})")
MAX_QUOTE_TOKENS = 400
ECHO_TOKENS = 12
THINKING_TOKENS = 24

_WORDS = tuple(
    (
        "agent cluster replica session token stream latency budget quota worker node actor model "
        "request reply message context cache prefix deadline retry backoff circuit breaker drain "
        "schedule placement resource memory core fraction slice metric alert dashboard ledger "
        "commit fence version snapshot transcript workspace sandbox network route proxy ingress "
        "gateway throughput capacity partition shard leader follower quorum heartbeat lease ticket "
        "image kernel process signal queue bound limit window bucket rate counter gauge histogram "
        "sample"
    ).split()
)


@dataclass(frozen=True)
class ReplyBlock:
    """One content block; ``pieces`` join to its text (or tool input JSON), each with its tokens."""

    kind: Literal["text", "thinking", "tool_use"]
    pieces: tuple[tuple[str, int], ...]
    tool_id: str = ""
    tool_name: str = ""
    tool_input: dict[str, Any] = field(default_factory=dict)
    signature: str = ""
    start_tokens: int = 0  # tokens spent before the first piece (a tool's name)

    @property
    def text(self) -> str:
        return "".join(p for p, _ in self.pieces)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "text":
            return {"type": "text", "text": self.text}
        if self.kind == "thinking":
            return {"type": "thinking", "thinking": self.text, "signature": self.signature}
        return {
            "type": "tool_use",
            "id": self.tool_id,
            "name": self.tool_name,
            "input": self.tool_input,
        }


@dataclass(frozen=True)
class Reply:
    blocks: tuple[ReplyBlock, ...]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    output_tokens: int


def seed_of(body: dict[str, Any]) -> int:
    """The reply seed: the model, system and messages, so max_tokens or stop_sequences do not
    change the words, only where they are cut."""
    canonical = json.dumps(
        [body.get("model"), body.get("system"), body.get("messages")], sort_keys=True, default=str
    )
    return int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "little")


def split_pieces(text: str) -> tuple[tuple[str, int], ...]:
    """Splits text into token-sized pieces that join back to exactly ``text``."""
    return tuple((p, count_text(p)) for p in PIECE_RE.findall(text))


def plan(
    request: MessagesRequest,
    seed: int,
    words_range: tuple[int, int],
    output_tokens: int | None = None,
) -> Reply:
    """The reply to ``request``, before and after ``max_tokens`` / ``stop_sequences``."""
    rng = random.Random(seed)
    blocks: list[ReplyBlock] = []
    if request.thinking is not None and request.thinking.type == "enabled":
        blocks.append(_thinking(rng, seed))
    natural: Literal["end_turn", "tool_use"] = "end_turn"
    turn = _last_user_turn(request)
    directives = _directives(turn.texts + turn.result_texts)
    if directives:
        body, natural = _directive_reply(request, directives, rng)
        blocks.extend(body)
    elif turn.results:
        blocks.append(ReplyBlock("text", split_pieces(_quote_results(request, turn.results))))
    elif forced := _forced_tool(request):
        blocks.append(_tool_block(rng, forced, _placeholder_input(request, forced)))
        natural = "tool_use"
    else:
        length = output_tokens if output_tokens is not None else rng.randint(*words_range)
        exact = output_tokens is not None
        blocks.append(ReplyBlock("text", _prose(rng, turn.texts, length, exact)))
    return _cut(blocks, natural, request.max_tokens, request.stop_sequences or [])


@dataclass
class _Turn:
    texts: list[str] = field(default_factory=list)
    results: list[ToolResultBlock] = field(default_factory=list)
    result_texts: list[str] = field(default_factory=list)


def _last_user_turn(request: MessagesRequest) -> _Turn:
    turn = _Turn()
    users = [m for m in request.conversation() if m.role == "user"]
    if not users:
        return turn
    for block in users[-1].blocks():
        if isinstance(block, TextBlock):
            turn.texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            turn.results.append(block)
            turn.result_texts.append(result_text(block))
    return turn


@dataclass(frozen=True)
class _Directive:
    name: str
    input: dict[str, Any] | None
    error: str | None = None


def _directives(texts: list[str]) -> list[_Directive]:
    """Directives in order; text inside a directive's JSON input is its data, not a directive."""
    found: list[_Directive] = []
    decoder = json.JSONDecoder()
    for text in texts:
        start = 0
        while (match := DIRECTIVE_RE.search(text, start)) is not None:
            directive, start = _parse_directive(text, match, decoder)
            found.append(directive)
    return found


def _parse_directive(
    text: str, match: re.Match[str], decoder: json.JSONDecoder
) -> tuple[_Directive, int]:
    name, pos = match.group(1), match.end()
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if text.startswith("]]", pos):
        return _Directive(name, {}), pos + 2
    try:
        tool_input, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        return _Directive(name, None, f"its input is not valid JSON ({e.msg})"), match.end()
    rest = text[pos:].lstrip()
    if not isinstance(tool_input, dict):
        return _Directive(name, None, "its input is not a JSON object"), pos
    if not rest.startswith("]]"):
        return _Directive(name, None, "it is not closed with ]]"), pos
    return _Directive(name, tool_input), pos


def _tool_id(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "toolu_01" + "".join(rng.choice(alphabet) for _ in range(22))


def _tool_block(rng: random.Random, name: str, tool_input: dict[str, Any]) -> ReplyBlock:
    return ReplyBlock(
        "tool_use",
        split_pieces(json.dumps(tool_input)),
        tool_id=_tool_id(rng),
        tool_name=name,
        tool_input=tool_input,
        start_tokens=count_text(name),
    )


def _directive_reply(
    request: MessagesRequest, directives: list[_Directive], rng: random.Random
) -> tuple[list[ReplyBlock], Literal["end_turn", "tool_use"]]:
    offered = set(request.tool_names())
    problems = [
        f"I cannot call the tool {d.name}: {d.error}." for d in directives if d.error is not None
    ]
    problems += [
        f"I cannot call the tool {d.name}: it is not among the tools offered to me."
        for d in directives
        if d.error is None and d.name not in offered
    ]
    if problems:
        return [ReplyBlock("text", split_pieces(" ".join(problems)))], "end_turn"
    names = ", ".join(d.name for d in directives)
    blocks = [ReplyBlock("text", split_pieces(f"I will call {names}."))]
    blocks += [_tool_block(rng, d.name, d.input or {}) for d in directives]
    return blocks, "tool_use"


def _quote_results(request: MessagesRequest, results: list[ToolResultBlock]) -> str:
    names: dict[str, str] = {}
    for message in request.conversation():
        for block in message.blocks():
            if isinstance(block, ToolUseBlock):
                names[block.id] = block.name
    quotes = []
    for result in results:
        pieces = split_pieces(result_text(result))
        text = "".join(p for p, _ in pieces[:MAX_QUOTE_TOKENS]).strip()
        verb = "failed with" if result.is_error else "returned"
        quotes.append(f'The tool {names.get(result.tool_use_id, "?")} {verb}: "{text}".')
    return " ".join(quotes)


def _forced_tool(request: MessagesRequest) -> str | None:
    choice, names = request.tool_choice, request.tool_names()
    if choice is None or not names:
        return None
    if choice.type == "tool" and choice.name in names:
        return choice.name
    if choice.type == "any":
        return names[0]
    return None


def _placeholder_input(request: MessagesRequest, name: str) -> dict[str, Any]:
    """Fills a forced tool's required properties with typed placeholders."""
    tool = next(t for t in request.tools or () if t.name == name)
    schema = tool.input_schema or {}
    properties = schema.get("properties", {})
    defaults = {"string": "example", "integer": 0, "number": 0, "boolean": False}
    out: dict[str, Any] = {}
    for prop in schema.get("required", []):
        kind = properties.get(prop, {}).get("type", "string")
        out[prop] = defaults.get(kind, [] if kind == "array" else {})
    return out


def _thinking(rng: random.Random, seed: int) -> ReplyBlock:
    words = " ".join(rng.choice(_WORDS) for _ in range(THINKING_TOKENS - 6))
    text = f"Let me think about this: {words}."
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=48).digest()
    return ReplyBlock("thinking", split_pieces(text), signature=base64.b64encode(digest).decode())


def _prose(
    rng: random.Random, texts: list[str], length: int, exact: bool
) -> tuple[tuple[str, int], ...]:
    """An echo of the user's words, then seeded sentences: exactly ``length`` tokens when
    ``exact``, else the sentence that crosses ``length`` is finished."""
    prompt = next((t for t in reversed(texts) if not t.lstrip().startswith("<")), "")
    echo = [p for p, tokens in split_pieces(prompt) if tokens][:ECHO_TOKENS]
    if echo:  # the user's own spacing, so "Hello!" echoes as "Hello!"
        echo[0] = " " + echo[0].lstrip()
    words: list[str] = ["You", " said", ":", *echo, "."] if echo else []
    while len(words) < length:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        words.append((" " if words else "") + sentence[0].capitalize())
        words.extend(" " + w for w in sentence[1:])
        words.append(".")
    return tuple((w, 1) for w in (words[:length] if exact else words))


def _cut(
    blocks: list[ReplyBlock],
    natural: Literal["end_turn", "tool_use"],
    max_tokens: int,
    stop_sequences: list[str],
) -> Reply:
    out: list[ReplyBlock] = []
    spent = 0
    for block in blocks:
        if block.kind == "tool_use":
            cost = block.start_tokens + sum(t for _, t in block.pieces)
            if spent + cost > max_tokens:
                return Reply(tuple(out), "max_tokens", None, max_tokens)
            out.append(block)
            spent += cost
            continue
        kept: list[tuple[str, int]] = []
        text = ""
        for piece, tokens in block.pieces:
            if spent + tokens > max_tokens:
                out.append(_with_pieces(block, kept))
                return Reply(tuple(out), "max_tokens", None, spent)
            kept.append((piece, tokens))
            spent += tokens
            text += piece
            if block.kind == "text" and stop_sequences:
                hit = _first_stop(text, stop_sequences)
                if hit is not None:
                    at, sequence = hit
                    out.append(_with_pieces(block, _trim(kept, at)))
                    return Reply(tuple(out), "stop_sequence", sequence, spent)
        out.append(_with_pieces(block, kept))
    return Reply(tuple(out), natural, None, spent)


def _with_pieces(block: ReplyBlock, pieces: list[tuple[str, int]]) -> ReplyBlock:
    return ReplyBlock(
        block.kind,
        tuple(pieces),
        block.tool_id,
        block.tool_name,
        block.tool_input,
        block.signature,
        block.start_tokens,
    )


def _first_stop(text: str, stop_sequences: list[str]) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in stop_sequences if s and s in text]
    return min(hits) if hits else None


def _trim(pieces: list[tuple[str, int]], at: int) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    length = 0
    for piece, tokens in pieces:
        if length + len(piece) <= at:
            out.append((piece, tokens))
            length += len(piece)
        else:
            if at > length:
                out.append((piece[: at - length], tokens))
            break
    return out
