"""What a tenant may ask of an agent, and the quotas on how much a user runs, on the real HTTP app
and the real control store in-process. Every refusal here comes before any replica is started
(no Ray in the unit tier); ``tests/integration/test_api.py`` drives the rest over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from actors import RuntimeConfig
from serve_app.admission import ControlGate
from serve_app.app import Api
from serve_app.control import ControlStore
from serve_app.errors import QuotaExceededError
from serve_app.models import Quotas
from serve_app.replicas import Replicas
from serve_app.routes import build_app

from .in_process_control import InProcessControl


class HeadOf(Replicas):
    """The agent replicas' edge, with the head's labels as Ray's node table would give them."""

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__(RuntimeConfig())
        self.labels = labels

    async def head_labels(self) -> dict[str, str]:
        return dict(self.labels)


class Http:
    def __init__(self, client: TestClient, store: ControlStore) -> None:
        self.client = client
        self.store = store

    def user(self, user_id: str, is_admin: bool = False, **quotas: Any) -> dict[str, str]:
        self.store.create_user(user_id, user_id, quotas, is_admin)
        return {"Authorization": "Bearer " + self.store.issue_key(user_id).api_key}

    def refusal(self, auth: dict[str, str], spec: dict[str, Any]) -> tuple[int, str, str]:
        answer = self.client.post("/v1/agents", json=spec, headers=auth)
        error = answer.json()["error"]
        return answer.status_code, error["type"], error["message"]


@pytest.fixture
def http(tmp_path: Path) -> Iterator[Http]:
    store = ControlStore(tmp_path / "control.db")
    control: Any = InProcessControl(store)
    api = Api(
        control,
        HeadOf({"hyperfleet/node-type": "head", "hyperfleet/pool": "head"}),
        ControlGate(control),
        1_000,
        default_quotas=Quotas(max_sessions=7),
    )
    with TestClient(build_app(api)) as client:
        yield Http(client, store)
    store.close()


def test_a_tenant_cannot_get_a_shell_on_the_head(http: Http) -> None:
    """The audit's reproduction, then each of its fields on its own."""
    tenant = http.user("usr_t")
    head_id = "a" * 56
    shell_on_the_head = {
        "tools": ["bash"],
        "isolation": "shared",
        "label_selector": {"ray.io/node-id": head_id},
        "resources": {"cores": 0},
    }
    status, kind, message = http.refusal(tenant, shell_on_the_head)
    assert (status, kind) == (422, "validation_error")
    assert message.startswith("isolation: agents with shell tools (bash) run with isolation 'vm'")
    fine = {"tools": ["bash"], "resources": {"cores": 1}}
    node_id = {"label_selector": {"ray.io/node-id": head_id}}
    for fields, refused in [
        ({"isolation": "vm", **node_id}, "label_selector.ray.io/node-id: not a label this"),
        (node_id, "label_selector.ray.io/node-id: not a label this platform lets you select"),
        ({"label_selector": {"hyperfleet/pool": "!cpu"}}, "'!cpu' is not a plain label value"),
        ({"label_selector": {"hyperfleet/pool": "in(head)"}}, "is not a plain label value"),
        (
            {"label_selector": {"hyperfleet/node-type": "head"}},
            "label_selector.hyperfleet/node-type: 'head' selects the head node",
        ),
        ({"resources": {"cores": 0}}, "resources.cores: must be at least 0.1 (asked: 0)"),
        ({"resources": {"cores": 0.05}}, "resources.cores: must be at least 0.1"),
        ({"tool_limits": {"memory_mb": 100_000}}, "tool_limits.memory_mb: must be at most 16384"),
    ]:
        status, kind, message = http.refusal(tenant, {**fine, **fields})
        assert (status, kind) == (422, "validation_error"), message
        assert refused in message, message
    spawned = http.client.post(
        "/v1/agents/spawn", json={"tools": ["bash"], "cores": 0}, headers=tenant
    )
    assert spawned.status_code == 422 and "resources.cores" in spawned.text
    assert http.store.list_agents("usr_t") == []  # nothing was stored, nothing started


def test_quotas_on_replicas_and_cores_refuse_before_anything_starts(http: Http) -> None:
    capped = http.user("usr_c", max_replicas=4, max_cores=2)
    status, kind, message = http.refusal(capped, {"replicas": {"min": 5, "max": 5}})
    assert (status, kind) == (403, "quota_exceeded")
    assert message.startswith("max_replicas: your agents run 0 replicas and this one asks for 5")
    status, kind, message = http.refusal(
        capped, {"replicas": {"min": 3, "max": 3}, "resources": {"cores": 1}}
    )
    assert (status, kind) == (403, "quota_exceeded")
    assert message.startswith("max_cores: your replicas take 0 cores and this agent asks for 3")
    assert http.store.list_agents("usr_c") == []


def test_quotas_count_every_agent_of_the_user(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.db")
    store.create_user("usr_q", "q", {"max_replicas": 5, "max_cores": 2.5})
    spec = '{"resources": {"cores": 0.5}}'
    store.create_agent("agt_1", "usr_q", spec, 3, 50)  # 3 replicas, 1.5 cores
    with pytest.raises(QuotaExceededError, match="max_replicas: your agents run 3 replicas"):
        store.create_agent("agt_2", "usr_q", spec, 3, 50)
    with pytest.raises(QuotaExceededError, match=r"max_cores: your replicas take 1\.5 cores"):
        store.create_agent("agt_2", "usr_q", '{"resources": {"cores": 0.75}}', 2, 50)
    store.create_agent("agt_2", "usr_q", '{"resources": {"cores": 0.5}}', 2, 50)  # 2.5 in all
    store.set_agent_status("agt_1", "deleted")  # a deleted agent frees what it held
    store.create_agent("agt_3", "usr_q", spec, 3, 50)
    # A quota lowered applies to the next agent at once, read where it is enforced.
    store.set_quotas("usr_q", {"max_replicas": 5, "max_cores": 1.0})
    with pytest.raises(QuotaExceededError, match="max_cores"):
        store.create_agent("agt_4", "usr_q", '{"resources": {"cores": 0.1}}', 0, 50)
    store.close()


def test_open_sessions_are_capped_atomically_across_writers(tmp_path: Path) -> None:
    """Twenty writers (as two control-store processes would be) open sessions at once against
    a quota of five: exactly five routes are added."""
    path = tmp_path / "control.db"
    setup = ControlStore(path)
    setup.create_user("usr_s", "s", {"max_sessions": 5})
    setup.create_agent("agt_s", "usr_s", "{}", 1, 50)
    stores = [ControlStore(path) for _ in range(20)]
    added: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(20)

    def open_one(n: int) -> None:
        start.wait(10)
        try:
            stores[n].add_route(f"ses_{n}", "agt_s", "usr_s", 0)
            added.append(f"ses_{n}")
        except QuotaExceededError as e:
            refused.append(e.message)

    threads = [threading.Thread(target=open_one, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(added) == 5 and len(refused) == 15
    assert refused[0].startswith("max_sessions: you have 5 open sessions, your quota is 5")
    setup.close_route(added[0])  # a closed session frees its place
    setup.add_route("ses_again", "agt_s", "usr_s", 0)
    setup.set_agent_status("agt_s", "deleted")  # and so do a deleted agent's
    setup.create_agent("agt_t", "usr_s", "{}", 1, 50)
    for n in range(5):
        setup.add_route(f"ses_t{n}", "agt_t", "usr_s", 0)
    for store in (setup, *stores):
        store.close()


def test_new_quotas_are_set_like_the_others(http: Http) -> None:
    admin = http.user("usr_admin", is_admin=True)
    created = http.client.post("/v1/users", json={"name": "n"}, headers=admin).json()
    assert created["quotas"] == {
        "max_agents": 50,
        "requests_per_minute": 100,
        "tokens_per_day": None,
        "max_replicas": 50,
        "max_cores": 50.0,
        "max_sessions": 7,  # the operator's default here
        "max_keys": 10,
    }
    patched = http.client.patch(
        f"/v1/users/{created['id']}",
        json={"quotas": {"max_replicas": 3, "max_cores": 1.5, "max_sessions": 2}},
        headers=admin,
    )
    assert patched.status_code == 200, patched.text
    quotas = patched.json()["quotas"]
    assert (quotas["max_replicas"], quotas["max_cores"], quotas["max_sessions"]) == (3, 1.5, 2)
    bad = http.client.patch(
        f"/v1/users/{created['id']}", json={"quotas": {"max_cores": -1}}, headers=admin
    )
    assert bad.status_code == 422 and "max_cores" in bad.json()["error"]["message"]


def test_live_keys_are_a_quota_checked_with_the_insert(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    setup = ControlStore(path)
    setup.create_user("usr_k", "k", {"max_keys": 4})
    first = setup.issue_key("usr_k")
    stores = [ControlStore(path) for _ in range(10)]
    issued: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(10)

    def issue_one(n: int) -> None:
        start.wait(10)
        try:
            issued.append(stores[n].issue_key("usr_k").prefix)
        except QuotaExceededError as e:
            refused.append(e.message)

    threads = [threading.Thread(target=issue_one, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(issued) == 3 and len(refused) == 7
    assert refused[0].startswith("max_keys: you have 4 live API keys, your quota is 4")
    assert setup.revoke_key(first.prefix, "usr_k")  # a revoked key frees its place
    assert setup.authenticate(setup.issue_key("usr_k").api_key) is not None
    for store in [setup, *stores]:
        store.close()
