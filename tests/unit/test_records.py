"""What the API's records show of themselves."""

from __future__ import annotations

from serve_app.records import Agent


def test_an_agents_repr_never_shows_its_spec_and_so_no_tenant_key() -> None:
    agent = Agent("agt_1", "usr_1", '{"anthropic_api_key": "sk-ant-canary"}', "ready", 1, 0.0)
    assert "sk-ant-canary" not in repr(agent) and "agt_1" in repr(agent)
