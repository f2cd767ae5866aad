"""Tenants' own Anthropic keys are sealed at rest in the control store, handed out redacted, and
opened only for a replica; keys an older version stored in plaintext are sealed at start."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from actors import AgentSpec
from serve_app.control import ControlStore
from serve_app.sealing import REDACTED, SealingError

KEY = "sk-ant-api03-tenant-own-key-0123456789"


def _on_disk(folder: Path) -> bytes:
    """Every byte the control store keeps: the database, its WAL and its shared memory."""
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())


def _spec_with_key(key: str = KEY) -> str:
    spec = json.loads(AgentSpec().model_dump_json())
    return json.dumps({**spec, "anthropic_api_key": key})


def test_a_tenant_key_is_stored_sealed_shown_redacted_and_opened_for_replicas(
    tmp_path: Path,
) -> None:
    store = ControlStore(tmp_path / "control.db")
    store.create_user("usr_a", "a", {})
    agent = store.create_agent("agt_a", "usr_a", _spec_with_key(), 1, 10)
    assert KEY.encode() not in _on_disk(tmp_path)  # the WAL included, while it is open
    (stored,) = (
        sqlite3.connect(tmp_path / "control.db").execute("SELECT spec FROM agents").fetchone()
    )
    assert json.loads(stored)["anthropic_api_key"].startswith("hfsealed:v1:")
    # What the ingress gets says the agent has a key of its own, and holds no key at all.
    for handed_out in (agent, store.get_agent("agt_a"), *store.list_agents("usr_a")):
        assert handed_out is not None and KEY not in handed_out.spec
        spec = AgentSpec.model_validate_json(handed_out.spec)
        assert spec.credential == "own"
        assert spec.anthropic_api_key is not None
        assert spec.anthropic_api_key.get_secret_value() == REDACTED
    replica_spec = store.replica_spec("agt_a")
    assert replica_spec is not None
    opened = AgentSpec.model_validate_json(replica_spec).anthropic_api_key
    assert opened is not None and opened.get_secret_value() == KEY
    store.close()
    assert KEY.encode() not in _on_disk(tmp_path)
    # Opened again (the same sealing key, kept next to the database): the same plaintext.
    again = ControlStore(tmp_path / "control.db")
    assert again.replica_spec("agt_a") == replica_spec
    again.close()


def test_a_plaintext_key_an_older_version_stored_is_sealed_at_start(tmp_path: Path) -> None:
    ControlStore(tmp_path / "control.db").close()
    db = sqlite3.connect(tmp_path / "control.db")
    db.execute(
        "INSERT INTO agents VALUES ('agt_old', 'usr_a', ?, 'ready', 1, 0)", (_spec_with_key(),)
    )
    db.execute(
        "INSERT INTO agents VALUES ('agt_platform', 'usr_a', ?, 'ready', 1, 0)",
        (AgentSpec().model_dump_json(),),
    )
    db.commit()
    db.close()
    assert KEY.encode() in _on_disk(tmp_path)  # what an older version left on disk

    store = ControlStore(tmp_path / "control.db")
    assert KEY.encode() not in _on_disk(tmp_path)  # no plaintext page left, in the WAL either
    replica_spec = store.replica_spec("agt_old")
    assert replica_spec is not None and json.loads(replica_spec)["anthropic_api_key"] == KEY
    platform = store.replica_spec("agt_platform")
    assert platform is not None and json.loads(platform)["anthropic_api_key"] is None
    store.close()


def test_a_sealed_key_opens_only_for_its_own_agent(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.db")
    store.create_agent("agt_a", "usr_a", _spec_with_key(), 1, 10)
    store.create_agent("agt_b", "usr_b", _spec_with_key("sk-ant-b"), 1, 10)
    store.close()
    db = sqlite3.connect(tmp_path / "control.db")
    # Someone who can write the database copies a's sealed key into b's row.
    db.execute(
        "UPDATE agents SET spec = (SELECT spec FROM agents WHERE id = 'agt_a') WHERE id = 'agt_b'"
    )
    db.commit()
    db.close()
    store = ControlStore(tmp_path / "control.db")
    with pytest.raises(SealingError):
        store.replica_spec("agt_b")
    store.close()
