"""``ReplyAccumulator`` on the SDK's own raw stream event types, built from the wire's JSON."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from actors import UpstreamError, Usage
from actors.reply import IncompleteReplyError, ReplyAccumulator

EVENTS = TypeAdapter(RawMessageStreamEvent)


def _feed(events: list[dict[str, Any]]) -> tuple[ReplyAccumulator, list[str]]:
    reply = ReplyAccumulator()
    texts = [t for e in events if (t := reply.add(EVENTS.validate_python(e)))]
    return reply, texts


def _start(**usage: Any) -> dict[str, Any]:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-5-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 100, "output_tokens": 1, **usage},
    }
    return {"type": "message_start", "message": message}


def _delta(index: int, **delta: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _block(index: int, **block: Any) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _end(stop_reason: str, **usage: Any) -> list[dict[str, Any]]:
    return [
        {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": usage},
        {"type": "message_stop"},
    ]


def test_text_thinking_tool_use_and_cumulative_usage() -> None:
    citation = {
        "type": "char_location",
        "cited_text": "fleet",
        "document_index": 0,
        "document_title": "doc",
        "start_char_index": 0,
        "end_char_index": 5,
    }
    reply, texts = _feed(
        [
            _start(
                cache_read_input_tokens=40,
                cache_creation={"ephemeral_1h_input_tokens": 7, "ephemeral_5m_input_tokens": 0},
            ),
            _block(0, type="thinking", thinking="", signature=""),
            _delta(0, type="thinking_delta", thinking="Let me "),
            _delta(0, type="thinking_delta", thinking="look."),
            _delta(0, type="signature_delta", signature="sig=="),
            {"type": "content_block_stop", "index": 0},
            _block(1, type="text", text=""),
            _delta(1, type="text_delta", text="The fleet "),
            _delta(1, type="citations_delta", citation=citation),
            _delta(1, type="text_delta", text="is up."),
            {"type": "content_block_stop", "index": 1},
            _block(2, type="tool_use", id="toolu_1", name="bash", input={}),
            _delta(2, type="input_json_delta", partial_json='{"command": '),
            _delta(2, type="input_json_delta", partial_json='"uptime"}'),
            {"type": "content_block_stop", "index": 2},
            *_end("tool_use", output_tokens=30, input_tokens=120),
        ]
    )
    assert texts == ["The fleet ", "is up."]
    result = reply.result()
    assert result.stop_reason == "tool_use"
    thinking, text, tool = result.content
    assert thinking == {"type": "thinking", "thinking": "Let me look.", "signature": "sig=="}
    assert text["text"] == "The fleet is up." and text["citations"][0]["cited_text"] == "fleet"
    assert tool == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "bash",
        "input": {"command": "uptime"},
    }
    # message_delta's counts are totals: input overwritten, cache reads kept from the start.
    assert result.usage == Usage(120, 30, 40, 0, 7)


def test_a_tool_call_without_input_deltas_keeps_its_start_input() -> None:
    reply, _ = _feed(
        [
            _start(),
            _block(0, type="tool_use", id="toolu_1", name="list_files", input={}),
            {"type": "content_block_stop", "index": 0},
            *_end("tool_use", output_tokens=5),
        ]
    )
    assert reply.result().content[0]["input"] == {}


def test_a_stream_that_stops_short_is_incomplete_and_says_whether_output_began() -> None:
    reply, _ = _feed([_start()])
    assert not reply.started
    with pytest.raises(IncompleteReplyError):
        reply.result()
    reply, _ = _feed(
        [_start(), _block(0, type="text", text=""), _delta(0, type="text_delta", text="Hi")]
    )
    assert reply.started
    with pytest.raises(IncompleteReplyError):
        reply.result()


def test_tool_input_that_is_not_json_fails_the_turn() -> None:
    with pytest.raises(UpstreamError, match="not JSON"):
        _feed(
            [
                _start(),
                _block(0, type="tool_use", id="toolu_1", name="bash", input={}),
                _delta(0, type="input_json_delta", partial_json='{"command": '),
                {"type": "content_block_stop", "index": 0},
            ]
        )
