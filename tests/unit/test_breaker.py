"""The circuit breaker records an outcome on every exit of a model call, and is per credential.

The agent loop runs against a scripted client (the SDK's own error types, no network): what a
user notices is whether a call is refused with ``CircuitOpenError`` after the API came back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx2
import pytest
from pydantic import SecretStr

from actors import AgentSpec, CircuitBreaker, CircuitOpenError, RuntimeConfig, UpstreamError
from actors.actor import build_host
from actors.breaker import BreakerRegistry
from actors.loop import AgentLoop, LoopConfig
from actors.store import SqliteSessionStore
from actors.tools import Workspace

COOLDOWN_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class ScriptedMessages:
    """``client.messages``: each ``create`` runs the next step of the script."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.calls = 0

    async def create(self, **params: Any) -> Any:
        self.calls += 1
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return await step()


class ScriptedClient:
    def __init__(self, *steps: Any) -> None:
        self.messages = ScriptedMessages(*steps)


def _status_error(status: int) -> anthropic.APIStatusError:
    request = httpx2.Request("POST", "https://api.invalid/v1/messages")
    response = httpx2.Response(status, request=request)
    if status == 400:
        return anthropic.BadRequestError("bad request", response=response, body=None)
    return anthropic.InternalServerError("overloaded", response=response, body=None)


def _loop(client: ScriptedClient, breaker: CircuitBreaker) -> AgentLoop:
    config = LoopConfig(model="m", system="", max_tokens=16, max_turns=1, stream_attempts=1)
    return AgentLoop(cast(Any, client), config, {}, breaker)


async def _ignore(kind: Any, data: dict[str, Any]) -> None:
    return None


async def _turn(loop: AgentLoop) -> None:
    await loop.run([], "hello", cast(Workspace, None), _ignore)


def _opened_breaker(clock: Clock) -> CircuitBreaker:
    """A breaker whose cool-down has just passed: the next call is its half-open trial."""
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=COOLDOWN_S, clock=clock)
    breaker.record_failure()
    clock.now_s += COOLDOWN_S
    assert breaker.state == "half_open"
    return breaker


async def test_a_4xx_during_the_half_open_trial_does_not_keep_the_breaker_refusing() -> None:
    clock = Clock()
    breaker = _opened_breaker(clock)
    client = ScriptedClient(_status_error(400), _status_error(400))
    loop = _loop(client, breaker)
    with pytest.raises(UpstreamError, match="refused the request"):
        await _turn(loop)
    # The API answered: the next call may try (before: CircuitOpenError until a restart).
    with pytest.raises(UpstreamError, match="refused the request"):
        await _turn(loop)
    assert client.messages.calls == 2


async def test_a_cancelled_half_open_trial_does_not_keep_the_breaker_refusing() -> None:
    clock = Clock()
    breaker = _opened_breaker(clock)
    started = asyncio.Event()

    async def hang() -> Any:
        started.set()
        await asyncio.Event().wait()

    client = ScriptedClient(hang, _status_error(400))
    loop = _loop(client, breaker)
    turn = asyncio.create_task(_turn(loop))
    await started.wait()
    turn.cancel()  # the turn's time limit, or a drain
    with pytest.raises(asyncio.CancelledError):
        await turn
    with pytest.raises(UpstreamError, match="refused the request"):
        await _turn(loop)  # reached the API: not refused by the breaker
    assert client.messages.calls == 2


async def test_a_failed_trial_opens_the_breaker_again() -> None:
    clock = Clock()
    breaker = _opened_breaker(clock)
    loop = _loop(ScriptedClient(_status_error(500)), breaker)
    with pytest.raises(UpstreamError):
        await _turn(loop)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        await _turn(loop)


def test_the_registry_keeps_one_breaker_per_credential_bounded() -> None:
    registry = BreakerRegistry(max_credentials=2)
    first = registry.for_credential("sk-ant-one")
    assert registry.for_credential("sk-ant-one") is first
    second = registry.for_credential("sk-ant-two")
    assert second is not first
    registry.for_credential("sk-ant-one")  # used: the least recently used is now "two"
    registry.for_credential("sk-ant-three")
    assert len(registry) == 2
    assert registry.for_credential("sk-ant-one") is first
    assert registry.for_credential("sk-ant-two") is not second  # evicted, then made anew


def test_replicas_share_their_credentials_breaker_and_only_theirs(tmp_path: Path) -> None:
    store = SqliteSessionStore(tmp_path / "sessions.db")
    runtime = RuntimeConfig(workspaces=str(tmp_path / "ws"))
    spec = AgentSpec()

    def host(credential: str) -> Any:
        key = SecretStr(credential)
        return build_host("a1", spec, runtime, cast(Any, None), store=store, credential=key)

    unique = str(tmp_path)  # keys no other test uses: the registry is this process's
    tenant_a, tenant_a_again = host(unique + "-a"), host(unique + "-a")
    tenant_b = host(unique + "-b")
    for _ in range(tenant_a.loop.breaker.failure_threshold):
        tenant_a.loop.breaker.record_failure()
    assert tenant_a_again.stats()["breaker"] == "open"  # the same key: the same breaker
    assert tenant_b.stats()["breaker"] == "closed"  # another tenant's key is not refused
    store.close()
