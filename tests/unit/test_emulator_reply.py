from __future__ import annotations

from typing import Any

from cluster.emulator.reply import plan, seed_of
from cluster.emulator.tokens import count_text
from cluster.emulator.wire import MessagesRequest, parse

BASH = {"name": "bash", "input_schema": {"type": "object", "properties": {}}}
READ = {
    "name": "read_file",
    "input_schema": {
        "type": "object",
        "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["path", "limit"],
    },
}


def _reply(messages: list[dict[str, Any]], **extra: Any) -> Any:
    body: dict[str, Any] = {"model": "claude-sonnet-5-5", "max_tokens": 1000, "messages": messages}
    body.update(extra)
    request: MessagesRequest = parse(MessagesRequest, body)
    return plan(request, seed_of(body), (20, 60), None)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_text_is_deterministic_and_echoes_the_user() -> None:
    a, b = _reply(_user("Tell me about Ray")), _reply(_user("Tell me about Ray"))
    assert a == b
    assert a.blocks[0].text.startswith("You said: Tell me about Ray.")
    assert a.stop_reason == "end_turn"
    assert a.output_tokens == count_text(a.blocks[0].text)
    assert _reply(_user("something else")).blocks[0].text != a.blocks[0].text


def test_max_tokens_cuts_the_same_words() -> None:
    full = _reply(_user("hello"))
    cut = _reply(_user("hello"), max_tokens=5)
    assert cut.stop_reason == "max_tokens"
    assert cut.output_tokens == 5
    assert full.blocks[0].text.startswith(cut.blocks[0].text)


def test_stop_sequence_cuts_before_it() -> None:
    full = _reply(_user("hello")).blocks[0].text
    word = full.split()[6]
    cut = _reply(_user("hello"), stop_sequences=["zzz-never", word])
    assert cut.stop_reason == "stop_sequence"
    assert cut.stop_sequence == word
    assert cut.blocks[0].text == full[: full.index(word)]


def test_directive_gives_tool_use_blocks() -> None:
    text = 'run [[tool bash {"command": "ls"}]] and [[tool bash {"command": "pwd"}]]'
    reply = _reply(_user(text), tools=[BASH])
    assert reply.stop_reason == "tool_use"
    uses = [b for b in reply.blocks if b.kind == "tool_use"]
    assert [u.tool_input for u in uses] == [{"command": "ls"}, {"command": "pwd"}]
    assert all(u.tool_name == "bash" and u.tool_id.startswith("toolu_") for u in uses)
    assert len({u.tool_id for u in uses}) == 2


def test_directive_for_tool_not_offered_answers_in_text() -> None:
    reply = _reply(_user("[[tool rm_rf {}]]"), tools=[BASH])
    assert reply.stop_reason == "end_turn"
    assert [b.kind for b in reply.blocks] == ["text"]
    assert "rm_rf" in reply.blocks[0].text and "not among the tools" in reply.blocks[0].text
    assert _reply(_user("[[tool bash {}]]")).stop_reason == "end_turn"
    none = _reply(_user("[[tool bash {}]]"), tools=[BASH], tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn"


def test_malformed_directive_is_explained() -> None:
    reply = _reply(_user("[[tool bash {not json]]"), tools=[BASH])
    assert "not valid JSON" in reply.blocks[0].text
    assert "not closed" in _reply(_user('[[tool bash {"a": 1}'), tools=[BASH]).blocks[0].text


def _round_trip(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "[[tool bash {}]]"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", **result}]},
    ]


def test_tool_results_are_quoted() -> None:
    reply = _reply(_round_trip({"content": "42 files"}), tools=[BASH])
    assert reply.stop_reason == "end_turn"
    assert reply.blocks[0].text == 'The tool bash returned: "42 files".'
    failed = _reply(_round_trip({"content": [{"type": "text", "text": "boom"}], "is_error": True}))
    assert failed.blocks[0].text == 'The tool bash failed with: "boom".'


def test_directive_inside_a_tool_result_is_followed() -> None:
    reply = _reply(_round_trip({"content": '[[tool bash {"n": 2}]]'}), tools=[BASH])
    assert reply.stop_reason == "tool_use"
    assert reply.blocks[-1].tool_input == {"n": 2}


def test_forced_tool_choice_fills_required_fields() -> None:
    reply = _reply(
        _user("hi"), tools=[BASH, READ], tool_choice={"type": "tool", "name": "read_file"}
    )
    assert reply.stop_reason == "tool_use"
    assert reply.blocks[0].tool_input == {"path": "example", "limit": 0}


def test_thinking_block_comes_first_with_a_signature() -> None:
    reply = _reply(
        _user("hi"), max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}
    )
    assert [b.kind for b in reply.blocks] == ["thinking", "text"]
    assert reply.blocks[0].signature
    assert reply.output_tokens == sum(count_text(b.text) for b in reply.blocks)


def test_forced_output_length_is_exact() -> None:
    body: dict[str, Any] = {"model": "claude-sonnet-5-5", "max_tokens": 500, "messages": _user("x")}
    reply = plan(parse(MessagesRequest, body), seed_of(body), (20, 60), 300)
    assert reply.output_tokens == 300


def test_directive_text_inside_a_directive_input_is_data() -> None:
    inner = '[[tool bash {"command": "ls"}]]'
    outer = "[[tool write " + __import__("json").dumps({"content": inner}) + "]]"
    write = {"name": "write", "input_schema": {"type": "object"}}
    reply = _reply(_user(outer), tools=[BASH, write])
    uses = [b for b in reply.blocks if b.kind == "tool_use"]
    assert [(u.tool_name, u.tool_input) for u in uses] == [("write", {"content": inner})]
