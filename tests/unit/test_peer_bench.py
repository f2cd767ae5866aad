"""benchmarks.peer_litellm compares paths that must ask the model the same thing: a bare Messages
API caller's body is the agent loop's for the same turn, so the emulator (which seeds its answer
from the model, system prompt and messages) answers both alike."""

from __future__ import annotations

from typing import Any, cast

from actors.breaker import CircuitBreaker
from actors.loop import AgentLoop, LoopConfig
from benchmarks.peer_load import Agent, messages_body
from cluster.emulator.reply import seed_of


def test_a_bare_callers_body_is_the_agent_loops_for_the_same_turn() -> None:
    agent = Agent(model="claude-sonnet-5-5", system="You are a load-test agent.", max_tokens=4096)
    loop = AgentLoop(
        cast(Any, None),
        LoopConfig(agent.model, agent.system, agent.max_tokens, max_turns=20),
        {},
        CircuitBreaker(),
    )
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "Load test message 0: what is the status of the fleet today?"},
        {"role": "assistant", "content": [{"type": "text", "text": "You said: Load test."}]},
    ]
    text = "Load test message 1: what is the status of the fleet today?"

    body = messages_body(agent, history, text)
    params = loop._params([*history, {"role": "user", "content": text}])

    assert body == {**params, "stream": True}
    assert seed_of(body) == seed_of(params)
