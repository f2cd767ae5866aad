"""The official ``anthropic`` client against the emulator over HTTP: it must not tell them apart."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from anthropic import AsyncAnthropic

from .conftest import EmulatorServer

MODEL = "claude-sonnet-5-5"
BASH = {
    "name": "bash",
    "description": "Run a shell command",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
    },
}
FAST_RETRY = {"x-emulator-retry-after-ms": "10"}


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[AsyncAnthropic]:
    async with AsyncAnthropic(base_url=emulator.base_url, api_key=emulator.api_key) as c:
        yield c


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_create(client: AsyncAnthropic) -> None:
    message = await client.messages.create(model=MODEL, max_tokens=200, messages=_user("Hello"))
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("You said: Hello.")
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    assert message._request_id is not None and message._request_id.startswith("req_")


async def test_stream_matches_create(client: AsyncAnthropic) -> None:
    messages = _user("Stream this please")
    created = await client.messages.create(model=MODEL, max_tokens=300, messages=messages)
    chunks: list[str] = []
    async with client.messages.stream(model=MODEL, max_tokens=300, messages=messages) as stream:
        async for text in stream.text_stream:
            chunks.append(text)
        final = await stream.get_final_message()
    assert len(chunks) >= 1
    assert "".join(chunks) == created.content[0].text  # type: ignore[union-attr]
    assert [b.model_dump(exclude={"parsed_output"}) for b in final.content] == [
        b.model_dump() for b in created.content
    ]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == created.usage.output_tokens
    assert final.usage.input_tokens == created.usage.input_tokens


async def test_raw_event_sequence(emulator: EmulatorServer) -> None:
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": _user("hi")}
    headers = {"x-api-key": emulator.api_key, "anthropic-version": "2023-06-01"}
    async with (
        httpx.AsyncClient(base_url=emulator.base_url) as http,
        http.stream("POST", "/v1/messages", json=body, headers=headers) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["request-id"].startswith("req_")
        events = [
            line.removeprefix("event: ")
            async for line in response.aiter_lines()
            if line.startswith("event: ")
        ]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert "content_block_delta" in events
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_tool_use_round_trip(client: AsyncAnthropic) -> None:
    messages: list[Any] = _user('Please [[tool bash {"command": "echo hi"}]]')
    first = await client.messages.create(
        model=MODEL,
        max_tokens=500,
        tools=[BASH],
        messages=messages,  # type: ignore[list-item]
    )
    assert first.stop_reason == "tool_use"
    tool_use = next(b for b in first.content if b.type == "tool_use")
    assert tool_use.name == "bash" and tool_use.input == {"command": "echo hi"}
    messages += [
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "hi"}],
        },
    ]
    async with client.messages.stream(
        model=MODEL,
        max_tokens=500,
        tools=[BASH],
        messages=messages,  # type: ignore[list-item]
    ) as stream:
        second = await stream.get_final_message()
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == 'The tool bash returned: "hi".'  # type: ignore[union-attr]


async def test_parallel_tool_use_streams_input_json(client: AsyncAnthropic) -> None:
    text = '[[tool bash {"command": "ls"}]] [[tool bash {"command": "pwd"}]]'
    async with client.messages.stream(
        model=MODEL,
        max_tokens=500,
        tools=[BASH],
        messages=_user(text),  # type: ignore[list-item]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "input_json" in kinds
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [u.input for u in uses] == [{"command": "ls"}, {"command": "pwd"}]
    assert final.stop_reason == "tool_use"


async def test_tool_not_offered_is_plain_text(client: AsyncAnthropic) -> None:
    reply = await client.messages.create(
        model=MODEL, max_tokens=200, messages=_user('[[tool bash {"command": "ls"}]]')
    )
    assert reply.stop_reason == "end_turn"
    assert "not among the tools" in reply.content[0].text  # type: ignore[union-attr]


async def test_count_tokens_agrees_with_usage(client: AsyncAnthropic) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": _user("count me"), "system": "be brief"}
    counted = await client.messages.count_tokens(**kwargs)
    created = await client.messages.create(max_tokens=50, **kwargs)
    assert counted.input_tokens == created.usage.input_tokens


async def test_max_tokens_and_stop_sequences(client: AsyncAnthropic) -> None:
    messages = _user("limits test")
    full = await client.messages.create(model=MODEL, max_tokens=500, messages=messages)
    text = full.content[0].text  # type: ignore[union-attr]
    short = await client.messages.create(model=MODEL, max_tokens=4, messages=messages)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 4
    word = text.split()[5]
    stopped = await client.messages.create(
        model=MODEL, max_tokens=500, messages=messages, stop_sequences=[word]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert stopped.content[0].text == text[: text.index(word)]  # type: ignore[union-attr]


async def test_prompt_cache_creation_then_read(client: AsyncAnthropic) -> None:
    system: Any = [
        {
            "type": "text",
            "text": "cache-test " + "policy " * 1200 + str(time.time_ns()),
            "cache_control": {"type": "ephemeral"},
        }
    ]
    first = await client.messages.create(
        model=MODEL, max_tokens=20, system=system, messages=_user("one")
    )
    assert (
        first.usage.cache_creation_input_tokens and first.usage.cache_creation_input_tokens > 1200
    )
    assert first.usage.cache_read_input_tokens == 0
    second = await client.messages.create(
        model=MODEL, max_tokens=20, system=system, messages=_user("two")
    )
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0


async def test_models(client: AsyncAnthropic) -> None:
    ids = [m.id async for m in client.models.list()]
    assert "claude-sonnet-5-5" in ids
    info = await client.models.retrieve("claude-haiku-4-5")
    assert info.id == "claude-haiku-4-5-20251001"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("gpt-4")


async def test_validation_errors_reach_the_client(client: AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=[{"role": "bot", "content": "x"}],  # type: ignore[misc,list-item]
        )
    assert info.value.status_code == 400
    assert "messages.0.role" in info.value.message
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert info.value.request_id is not None
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="gpt-4", max_tokens=10, messages=_user("x"))


async def test_authentication(emulator: EmulatorServer) -> None:
    async with AsyncAnthropic(base_url=emulator.base_url, api_key="sk-wrong") as wrong:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await wrong.messages.create(model=MODEL, max_tokens=10, messages=_user("x"))
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    async with httpx.AsyncClient(base_url=emulator.base_url) as http:
        response = await http.post("/v1/messages", json={}, headers={"anthropic-version": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "x-api-key header is required"
    assert response.headers["request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", anthropic.RateLimitError),
        ("529", anthropic.OverloadedError),
        ("500", anthropic.InternalServerError),
    ],
)
async def test_sdk_retries_then_surfaces(
    emulator: EmulatorServer, fault: str, error: type[Exception]
) -> None:
    before = emulator.stats()["faults"].get(fault, 0)
    async with AsyncAnthropic(
        base_url=emulator.base_url, api_key=emulator.api_key, max_retries=2
    ) as client:
        with pytest.raises(error) as info:
            await client.messages.create(
                model=MODEL,
                max_tokens=10,
                messages=_user("x"),
                extra_headers={"x-emulator-fault": fault, **FAST_RETRY},
            )
    assert isinstance(info.value, anthropic.APIStatusError)
    assert info.value.status_code == int(fault)
    assert emulator.stats()["faults"][fault] - before == 3  # the first try and two retries
    if fault == "429":
        assert info.value.response.headers["retry-after"] == "1"


async def test_midstream_error_event_raises(client: AsyncAnthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        async with client.messages.stream(
            model=MODEL,
            max_tokens=200,
            messages=_user("x"),
            extra_headers={"x-emulator-fault": "midstream", "x-emulator-fault-after": "5"},
        ) as stream:
            async for _ in stream:
                pass
    assert "overloaded_error" in str(info.value)


async def test_dropped_stream_raises_a_connection_error(client: AsyncAnthropic) -> None:
    received: list[str] = []
    # The SDK does not wrap a transport error raised mid-stream: its httpx2 error surfaces as is.
    with pytest.raises(httpx2.RemoteProtocolError):
        async with client.messages.stream(
            model=MODEL,
            max_tokens=200,
            messages=_user("x"),
            extra_headers={"x-emulator-fault": "drop", "x-emulator-fault-after": "4"},
        ) as stream:
            async for event in stream:
                received.append(event.type)
    assert received[:1] == ["message_start"]


async def test_latency_headers_delay_the_first_token(client: AsyncAnthropic) -> None:
    started = time.monotonic()
    async with client.messages.stream(
        model=MODEL,
        max_tokens=50,
        messages=_user("slow"),
        extra_headers={"x-emulator-ttft-ms": "300", "x-emulator-tps": "200"},
    ) as stream:
        first = None
        async for _ in stream.text_stream:
            first = first or time.monotonic()
        final = await stream.get_final_message()
    # Lower bounds only, less the 20 ms coalescing window: the knob works, not how fast we are.
    assert first is not None and first - started >= 0.28
    assert time.monotonic() - started >= 0.28 + (final.usage.output_tokens - 1) / 200 - 0.02
