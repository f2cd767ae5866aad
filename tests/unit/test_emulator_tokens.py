from __future__ import annotations

from typing import Any

from cluster.emulator.tokens import PromptCache, count_prompt, count_text, segments
from cluster.emulator.wire import MessagesRequest, parse

LONG = " ".join(["word"] * 1500)


def _request(system: Any, user: str = "hello") -> MessagesRequest:
    body = {
        "model": "claude-sonnet-5-5",
        "max_tokens": 10,
        "system": system,
        "messages": [{"role": "user", "content": user}],
    }
    return parse(MessagesRequest, body)


def _cached_system(text: str, ttl: str | None = None) -> list[dict[str, Any]]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        control["ttl"] = ttl
    return [{"type": "text", "text": text, "cache_control": control}]


def test_count_text_counts_words_and_punctuation() -> None:
    assert count_text("Hello, world!") == 4
    assert count_text("   ") == 0


def test_first_request_writes_repeat_reads() -> None:
    cache = PromptCache(min_tokens=1024)
    request = _request(_cached_system(LONG))
    total = count_prompt(request)
    first = cache.account("m", segments(request))
    assert first.cache_creation_input_tokens == 1500
    assert first.ephemeral_5m_input_tokens == 1500
    assert first.cache_read_input_tokens == 0
    assert first.input_tokens == total - 1500
    second = cache.account("m", segments(_request(_cached_system(LONG), user="another")))
    assert second.cache_read_input_tokens == 1500
    assert second.cache_creation_input_tokens == 0
    assert cache.account("other-model", segments(request)).cache_read_input_tokens == 0


def test_short_prefix_is_not_cached() -> None:
    cache = PromptCache(min_tokens=1024)
    request = _request(_cached_system("short system prompt"))
    for _ in range(2):
        usage = cache.account("m", segments(request))
        assert usage.cache_creation_input_tokens == usage.cache_read_input_tokens == 0
        assert usage.input_tokens == count_prompt(request)


def test_entries_expire_after_their_ttl() -> None:
    now = [0.0]
    cache = PromptCache(min_tokens=10, clock=lambda: now[0])
    request = _request(_cached_system(LONG))
    cache.account("m", segments(request))
    now[0] = 299.0
    assert cache.account("m", segments(request)).cache_read_input_tokens == 1500
    now[0] = 299.0 + 301.0
    assert cache.account("m", segments(request)).cache_creation_input_tokens == 1500
    long_lived = _request(_cached_system(LONG + " x", ttl="1h"))
    assert cache.account("m", segments(long_lived)).ephemeral_1h_input_tokens == 1501
    now[0] += 3000
    assert cache.account("m", segments(long_lived)).cache_read_input_tokens == 1501


def test_longest_cached_prefix_is_read_and_the_rest_written() -> None:
    cache = PromptCache(min_tokens=10)
    first = [
        {"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}},
    ]
    cache.account("m", segments(_request(first)))
    both = [*first, {"type": "text", "text": "more " * 20, "cache_control": {"type": "ephemeral"}}]
    usage = cache.account("m", segments(_request(both)))
    assert usage.cache_read_input_tokens == 1500
    assert usage.cache_creation_input_tokens == 20


def test_cache_is_bounded() -> None:
    cache = PromptCache(min_tokens=1, max_entries=3)
    requests = [_request(_cached_system(f"prompt number {i}")) for i in range(5)]
    for request in requests:
        cache.account("m", segments(request))
    assert cache.account("m", segments(requests[0])).cache_read_input_tokens == 0
    assert cache.account("m", segments(requests[4])).cache_read_input_tokens > 0
