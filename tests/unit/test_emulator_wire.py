from __future__ import annotations

from typing import Any

import pytest

from cluster.emulator.wire import CountTokensRequest, MessagesRequest, RequestError, parse


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-5-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def _refused(body: object) -> str:
    with pytest.raises(RequestError) as info:
        parse(MessagesRequest, body)
    assert info.value.status == 400
    assert info.value.error_type == "invalid_request_error"
    return info.value.message


@pytest.mark.parametrize("field", ["model", "max_tokens", "messages"])
def test_missing_required_field_is_named(field: str) -> None:
    body = _body()
    del body[field]
    assert _refused(body) == f"{field}: Field required"


def test_unknown_role_names_the_message() -> None:
    message = _refused(_body(messages=[{"role": "bot", "content": "hi"}]))
    assert message.startswith("messages.0.role: Input should be")


def test_empty_content_is_refused_except_final_assistant() -> None:
    message = _refused(_body(messages=[{"role": "user", "content": []}]))
    assert "messages.0: all messages must have non-empty content" in message
    assert "must be non-empty" in _refused(
        _body(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}])
    )
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert parse(MessagesRequest, _body(messages=prefill)).messages[1].content == ""


def test_non_object_body_and_bad_types() -> None:
    assert "dictionary" in _refused([1, 2])
    assert _refused(_body(max_tokens=0)).startswith("max_tokens: Input should be greater")
    assert _refused(_body(temperature=2)).startswith("temperature:")
    assert _refused(_body(frobnicate=True)) == "frobnicate: Extra inputs are not permitted"


def test_tool_result_must_answer_previous_tool_use() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]},
    ]
    assert "unexpected `tool_use_id`" in _refused(_body(messages=messages))


def test_tool_use_must_be_answered_in_next_message() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_a", "name": "bash", "input": {}}],
        },
        {"role": "user", "content": "never mind"},
    ]
    assert "without `tool_result` blocks immediately after: toolu_a" in _refused(
        _body(messages=messages)
    )


def test_at_most_four_cache_breakpoints() -> None:
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    message = _refused(_body(messages=[{"role": "user", "content": [block] * 5}]))
    assert message == "A maximum of 4 blocks with cache_control may be provided. Found 5."


def test_thinking_budget_rules() -> None:
    assert "greater than or equal to 1024" in _refused(
        _body(thinking={"type": "enabled", "budget_tokens": 10})
    )
    assert "`max_tokens` must be greater" in _refused(
        _body(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 4000})
    )


def test_duplicate_and_schemaless_tools() -> None:
    tool = {"name": "t", "input_schema": {"type": "object"}}
    assert _refused(_body(tools=[tool, tool])) == "tools: Tool names must be unique."
    assert _refused(_body(tools=[{"name": "t"}])) == "tools.0.custom.input_schema: Field required"
    assert "String should match pattern" in _refused(
        _body(tools=[{"name": "bad name", "input_schema": {}}])
    )


def test_what_claude_code_sends_is_accepted() -> None:
    body = _body(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "system", "content": "env", "output_config": {"effort": "medium"}},
        ],
        thinking={"type": "adaptive", "display": "omitted"},
        metadata={"user_id": "u"},
        context_management={"edits": []},
        output_config={"effort": "medium"},
        tools=[{"name": "Bash", "input_schema": {"type": "object"}, "strict": True}],
    )
    request = parse(MessagesRequest, body)
    assert [b.text for b in request.system_blocks()] == ["env"]
    assert [m.role for m in request.conversation()] == ["user"]


def test_count_tokens_needs_no_max_tokens() -> None:
    body = _body()
    del body["max_tokens"]
    assert parse(CountTokensRequest, body).model == "claude-sonnet-5-5"
