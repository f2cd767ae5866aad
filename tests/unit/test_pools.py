"""Agent pools in the control store (``serve_app/pools.py``), on a real SQLite file: allocation
within the fleet's cap and the owner's quotas, fresh indices, placement, and moving routes off a
replica that is draining or gone, never off a ready one."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.control import ControlStore
from serve_app.pools import CLAIM_TTL_S

pytestmark = pytest.mark.unit

FLEET = 1_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ControlStore]:
    store = ControlStore(tmp_path / "control.db")
    store.create_user("usr_a", "a", {"max_replicas": 5, "max_cores": 10.0})
    yield store
    store.close()


def _agent(store: ControlStore, agent_id: str, replicas: int = 1, cores: float = 1.0) -> None:
    spec = json.dumps({"resources": {"cores": cores}, "max_tokens": 64})
    store.create_agent(agent_id, "usr_a", spec, replicas, max_agents=50)


def _ready(store: ControlStore, agent_id: str, *indices: int) -> None:
    for index in indices:
        assert store.pools.set_state(agent_id, index, "ready", None)


def test_a_new_agent_has_its_replicas_starting_and_a_pool_row(store: ControlStore) -> None:
    _agent(store, "agt_1", replicas=2)
    rows = store.pools.replicas("agt_1")
    assert [(r.index, r.state) for r in rows] == [(0, "starting"), (1, "starting")]
    pool = store.pools.pool("agt_1")
    assert pool is not None and pool.desired == 2 and pool.reason == "created"
    assert store.pools.placement("agt_1") == []  # nothing ready: nowhere to place a session


def test_allocation_takes_fresh_indices_and_never_reuses_one(store: ControlStore) -> None:
    _agent(store, "agt_1")
    assert store.pools.allocate("agt_1", 2, FLEET) == [1, 2]
    store.pools.remove("agt_1", 2)
    assert store.pools.allocate("agt_1", 1, FLEET) == [3]  # 2's name stays unused
    agent = store.get_agent("agt_1")
    assert agent is not None and agent.replicas == 3  # the live rows, what quotas count


def test_allocation_stops_at_the_owners_replicas_and_cores(store: ControlStore) -> None:
    _agent(store, "agt_1")
    assert store.pools.allocate("agt_1", 10, FLEET) == [1, 2, 3, 4]  # max_replicas 5
    assert store.pools.allocate("agt_1", 1, FLEET) == []
    store.set_quotas("usr_a", {"max_replicas": 50, "max_cores": 10.0})
    _agent(store, "agt_big", cores=4.0)  # 5 + 4 = 9 cores of 10
    assert store.pools.allocate("agt_big", 3, FLEET) == []  # a second 4-core one does not fit


def test_allocation_stops_at_the_fleets_cap(store: ControlStore) -> None:
    store.set_quotas("usr_a", {"max_replicas": 100, "max_cores": 100.0})
    _agent(store, "agt_1")
    _agent(store, "agt_2")
    assert store.pools.allocate("agt_1", 10, fleet_max=4) == [1, 2]  # 2 exist of 4
    assert store.pools.allocate("agt_2", 1, fleet_max=4) == []


def test_a_deleted_agent_gets_no_replicas_and_its_rows_go(store: ControlStore) -> None:
    _agent(store, "agt_1", replicas=2)
    store.set_agent_status("agt_1", "deleted")
    assert store.pools.allocate("agt_1", 1, FLEET) == []
    listed = {a.id: a for a in store.pools.agents()}
    assert listed["agt_1"].spec == ""  # the controller stops what still runs
    store.pools.drop("agt_1")
    assert "agt_1" not in {a.id for a in store.pools.agents()}


def test_placement_is_least_loaded_among_ready_replicas(store: ControlStore) -> None:
    _agent(store, "agt_1", replicas=3)
    _ready(store, "agt_1", 0, 1)
    for n, replica in enumerate([0, 0, 1]):
        store.add_route(f"ses_{n}", "agt_1", "usr_a", replica)
    assert store.pools.placement("agt_1") == [(1, 1), (0, 2)]  # 2 is still starting


def test_concurrent_opens_spread_by_their_claims_until_their_routes_are_recorded(
    tmp_path: Path,
) -> None:
    """Twelve opens that all ask for placement before any records its route land 6/6 (each
    sees the others' claims), not 12/0; a recorded route ends its claim, so it counts once;
    a claim never settled (an open that failed) stops counting after ``CLAIM_TTL_S``."""
    now = [1_000.0]
    store = ControlStore(tmp_path / "control.db", clock=lambda: now[0])
    try:
        store.create_user("usr_a", "a", {"max_replicas": 5, "max_cores": 10.0})
        _agent(store, "agt_1", replicas=2)
        _ready(store, "agt_1", 0, 1)
        chosen = [store.pools.placement("agt_1", claim=True)[0][0] for _ in range(12)]
        assert sorted(chosen.count(i) for i in (0, 1)) == [6, 6]
        assert dict(store.pools.placement("agt_1")) == {0: 6, 1: 6}  # claims count as load
        for n, index in enumerate(chosen):
            store.add_route(f"ses_{n}", "agt_1", "usr_a", index)
        assert dict(store.pools.placement("agt_1")) == {0: 6, 1: 6}  # routes, not also claims
        store.pools.placement("agt_1", claim=True)  # an open that never records its route
        assert sorted(dict(store.pools.placement("agt_1")).values()) == [6, 7]
        now[0] += CLAIM_TTL_S + 1
        assert dict(store.pools.placement("agt_1")) == {0: 6, 1: 6}
        # A claimed replica that refuses the open gives the claim back at once; an open that
        # lands on a replica it did not claim ends no one else's claim.
        refused = store.pools.placement("agt_1", claim=True)[0][0]
        other = store.pools.placement("agt_1", claim=True)[0][0]
        assert {refused, other} == {0, 1}
        store.pools.settle("agt_1", refused)
        store.add_route("ses_x", "agt_1", "usr_a", refused)  # claimed nothing there now
        assert dict(store.pools.placement("agt_1")) == {refused: 7, other: 7}
    finally:
        store.close()


def test_routes_move_only_off_a_replica_that_is_not_ready(store: ControlStore) -> None:
    _agent(store, "agt_1", replicas=3)
    _ready(store, "agt_1", 0, 1, 2)
    for n in range(4):
        store.add_route(f"ses_{n}", "agt_1", "usr_a", 2)
    route = store.rehome("ses_0", 2)
    assert route is not None and route.replica == 2  # 2 is ready: it keeps its sessions
    store.pools.set_state("agt_1", 2, "draining", 123.0)
    moved = store.rehome("ses_0", 2)
    assert moved is not None and moved.replica in (0, 1)
    assert store.rehome("ses_0", 2) == moved  # already moved: the same answer, no second move
    assert store.pools.move_off("agt_1", 2, None) == 3  # the rest, spread over 0 and 1
    load = dict(store.pools.placement("agt_1"))
    assert sorted(load.values()) == [2, 2]


def test_a_gone_replicas_routes_move_and_none_move_without_a_ready_one(
    store: ControlStore,
) -> None:
    _agent(store, "agt_1", replicas=2)
    _ready(store, "agt_1", 0)
    store.add_route("ses_a", "agt_1", "usr_a", 0)
    store.pools.set_state("agt_1", 0, "draining", None)
    stuck = store.rehome("ses_a", 0)
    assert stuck is not None and stuck.replica == 0  # 1 is starting: nowhere to go yet
    _ready(store, "agt_1", 1)
    store.pools.remove("agt_1", 0)
    moved = store.rehome("ses_a", 0)
    assert moved is not None and moved.replica == 1
    store.close_route("ses_a")
    assert store.rehome("ses_a", 1) is None


def test_agents_from_before_pools_are_adopted_once(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    store = ControlStore(path)
    store.create_user("usr_a", "a", {})
    _agent(store, "agt_old", replicas=2)
    store.close()
    db = sqlite3.connect(path)  # as a version before pools left it: no pool, no replica rows
    db.execute("DELETE FROM replicas")
    db.execute("DELETE FROM pools")
    db.commit()
    db.close()
    again = ControlStore(path)
    rows = again.pools.replicas("agt_old")
    assert [(r.index, r.state) for r in rows] == [(0, "ready"), (1, "ready")]
    assert again.pools.allocate("agt_old", 1, FLEET) == [2]
    again.close()


def test_the_pool_row_keeps_the_last_decision(store: ControlStore) -> None:
    _agent(store, "agt_1")
    store.pools.record("agt_1", 3, "panic", json.dumps({"last_up_at": 5.0}))
    pool = store.pools.pool("agt_1")
    assert pool is not None and (pool.desired, pool.reason) == (3, "panic")
    assert json.loads(pool.state) == {"last_up_at": 5.0}
