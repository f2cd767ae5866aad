"""Agent pools on the real local cluster: replicas follow session load up and back down, and no
client request fails while they do (``autoscaling/pool.py``, ``serve_app/app.py``'s moves).

The pool controller is the one the ingress starts (ticking twice a second here); the agent's
cooldowns are short so that a whole ramp takes seconds. Sessions keep talking while their
replicas drain: each message must succeed, on whichever replica the session lives by then.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import ray

from actors import replica_name
from hyperfleet.names import CONTROL_ACTOR_NAME, NAMESPACE

from .api_client import Client, new_session, new_user
from .conftest import ApiServer
from .waiting import wait_until

pytestmark = pytest.mark.integration

MAX_SESSIONS = 10
RAMP_SESSIONS = 25  # 25 / (10 x 0.8) -> 4 replicas, the max
SURVIVORS = 3
SCALE_WAIT_S = 90.0


@pytest.fixture(scope="module")
def admin(api_server: ApiServer) -> Iterator[Client]:
    client = Client(api_server.base_url, api_server.admin_key)
    yield client
    client.http.close()


def _spec(**replicas: Any) -> dict[str, Any]:
    return {
        "system": "You answer briefly.",
        "max_sessions": MAX_SESSIONS,
        "isolation": "shared",
        "resources": {"cores": 0.25, "memory_mb": 256},
        "replicas": {
            "min": 1,
            "max": 4,
            "scale_up_cooldown_s": 1,
            "scale_down_cooldown_s": 3,
            **replicas,
        },
    }


def _detail(user: Client, agent_id: str) -> dict[str, Any]:
    detail: dict[str, Any] = user.ok("GET", f"/v1/agents/{agent_id}")
    return detail


def _states(detail: dict[str, Any]) -> list[str]:
    return [r["state"] for r in detail["replicas"]]


def _when(user: Client, agent_id: str, wanted: Any) -> Any:
    """A check for ``wait_until``: the agent's detail once ``wanted(states)`` holds."""

    def check() -> dict[str, Any] | None:
        detail = _detail(user, agent_id)
        return detail if wanted(_states(detail)) else None

    return check


def _route_replica(session_id: str) -> int:
    control = ray.get_actor(CONTROL_ACTOR_NAME, namespace=NAMESPACE)
    route = ray.get(control.get_route.remote(session_id), timeout=30)
    assert route is not None
    return int(route.replica)


class Talker:
    """Sends messages to sessions in a loop on a thread, JSON and SSE in turn, recording every
    answer's status (an SSE turn that ends in an ``error`` event counts as a failure)."""

    def __init__(self, user: Client, sessions: list[str]) -> None:
        self.user = user
        self.sessions = sessions
        self.statuses: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Talker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        streamed = False
        while not self._stop.is_set():
            for sid in self.sessions:
                streamed = not streamed  # every other message is an SSE turn
                response = self.user.request(
                    "POST",
                    f"/v1/sessions/{sid}/messages",
                    json={"content": "still there?", "stream": streamed},
                    headers={"Idempotency-Key": uuid.uuid4().hex},
                )
                status = response.status_code
                if streamed and (
                    "event: error" in response.text or "turn_end" not in response.text
                ):
                    status = 599  # a stream that ended in an error event, or not at its end
                self.statuses.append((sid, status, response.text[:300]))


def test_a_pool_follows_its_sessions_up_and_back_down(admin: Client, api_server: ApiServer) -> None:
    user = new_user(admin, api_server, requests_per_minute=100_000)
    agent = user.ok("POST", "/v1/agents", 201, json=_spec())
    assert agent["replicas"]["scale_up_at"] == 0.8  # the operator's defaults filled in
    assert agent["replicas"]["scale_down_at"] == 0.3
    agent_id = agent["id"]

    failures: list[str] = []
    sessions: list[str] = []
    for _ in range(RAMP_SESSIONS):  # as fast as the API answers: the pool must keep up
        opened = user.request("POST", f"/v1/agents/{agent_id}/sessions")
        if opened.status_code != 201:
            failures.append(f"open: {opened.status_code} {opened.text[:300]}")
            continue
        sessions.append(opened.json()["id"])
        sent = user.request(
            "POST", f"/v1/sessions/{sessions[-1]}/messages", json={"content": "hello"}
        )
        if sent.status_code != 200:
            failures.append(f"send: {sent.status_code} {sent.text[:300]}")
    assert not failures, failures

    grown = wait_until(
        _when(user, agent_id, lambda states: states.count("ready") >= 3),
        "3 or more ready replicas",
        SCALE_WAIT_S,
        interval_s=0.5,
    )
    assert grown["desired_replicas"] >= 3 and grown["scaling_reason"]
    assert grown["sessions"] == RAMP_SESSIONS
    stats = user.ok("GET", "/v1/agents/stats")
    assert stats["desired_replicas"] >= 3 and stats["replicas_by_state"]["ready"] >= 3

    # The survivors are the sessions opened last: on the replicas added last, which drain.
    survivors = sessions[-SURVIVORS:]
    homes = {sid: _route_replica(sid) for sid in survivors}
    assert max(homes.values()) >= 1, homes
    for sid in sessions[:-SURVIVORS]:
        user.ok("DELETE", f"/v1/sessions/{sid}")

    with Talker(user, survivors) as talker:
        shrunk = wait_until(
            _when(user, agent_id, lambda states: states == ["ready"]),
            "the pool back at one ready replica",
            SCALE_WAIT_S,
            interval_s=0.5,
        )
    assert shrunk["desired_replicas"] == 1
    bad = [s for s in talker.statuses if s[1] != 200]
    assert not bad, bad
    assert len(talker.statuses) >= SURVIVORS  # the talker talked while replicas drained

    last = shrunk["replicas"][0]["index"]
    for sid in survivors:  # every one lives on the last replica now, and answers
        assert _route_replica(sid) == last
        turn = user.ok("POST", f"/v1/sessions/{sid}/messages", json={"content": "and now?"})
        assert turn["session_id"] == sid
        page = user.ok("GET", f"/v1/sessions/{sid}/messages")
        assert len(page["turns"]) >= 3  # its earlier turns came along (from the store)
    assert any(home != last for home in homes.values())  # at least one session moved
    user.ok("DELETE", f"/v1/agents/{agent_id}")


def test_bad_scaling_fields_are_refused(admin: Client, api_server: ApiServer) -> None:
    alice = new_user(admin, api_server)
    crossed = _spec(scale_up_at=0.5, scale_down_at=0.6)
    answer = alice.request("POST", "/v1/agents", json=crossed)
    assert answer.status_code == 422 and "scale_down_at" in answer.text
    # Only one given: it must still leave a band with the operator's other default (0.8 up).
    high_down = _spec(scale_down_at=0.9)
    answer = alice.request("POST", "/v1/agents", json=high_down)
    assert answer.status_code == 422 and "scale_down_at" in answer.text
    too_big = _spec(max=1001)
    assert alice.request("POST", "/v1/agents", json=too_big).status_code == 422


def _replica_pid(agent_id: str, index: int) -> int:
    handle = ray.get_actor(replica_name(agent_id, index), namespace=NAMESPACE)
    return int(ray.get(handle.stats.remote(), timeout=30)["pid"])


def _resend_until_ok(user: Client, session_id: str, content: str) -> dict[str, Any]:
    """Sends one message as a good client does: the same idempotency key, resent while the
    answer says a resend may pass (``x-should-retry``), for at most ``SCALE_WAIT_S``."""
    key = uuid.uuid4().hex

    def attempt() -> dict[str, Any] | None:
        answer = user.request(
            "POST",
            f"/v1/sessions/{session_id}/messages",
            json={"content": content},
            headers={"Idempotency-Key": key},
        )
        if answer.status_code == 200:
            turn: dict[str, Any] = answer.json()
            return turn
        assert answer.headers.get("x-should-retry") == "true", answer.text
        return None

    return wait_until(attempt, f"a turn in {session_id}", SCALE_WAIT_S, interval_s=0.5)


def _stopped(pid: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    return False


def test_a_replica_that_stops_answering_is_replaced_and_its_sessions_go_on(
    admin: Client, api_server: ApiServer
) -> None:
    """SIGSTOP (a hung process, a VM frozen) of a scaled-up replica and then of replica 0:
    within ``replica_unresponsive_s`` the scaled-up one's session moves to a ready replica and
    answers with its earlier turns, and the replica is gone for good; replica 0 is restarted by
    Ray under its name (a batch job may address it) with a new process, and its sessions, which
    stay routed to it as after a crash, answer with their earlier turns."""
    user = new_user(admin, api_server, requests_per_minute=100_000)
    # One session out of ten (10 %) is past scale_up_at: a second replica starts at once.
    spec = _spec(max=2, scale_up_at=0.1, scale_down_at=0.05, scale_down_cooldown_s=600)
    agent_id = user.ok("POST", "/v1/agents", 201, json=spec)["id"]
    first = new_session(user, agent_id)
    user.ok("POST", f"/v1/sessions/{first}/messages", json={"content": "one"})
    wait_until(
        _when(user, agent_id, lambda states: states == ["ready", "ready"]),
        "two ready replicas",
        SCALE_WAIT_S,
        interval_s=0.5,
    )
    second = new_session(user, agent_id)  # the least-loaded replica: the new one
    scaled = _route_replica(second)
    assert scaled >= 1
    user.ok("POST", f"/v1/sessions/{second}/messages", json={"content": "two"})

    paused: list[int] = []
    try:
        pid = _replica_pid(agent_id, scaled)
        os.kill(pid, signal.SIGSTOP)
        paused.append(pid)
        turn = _resend_until_ok(user, second, "still there?")
        assert turn["index"] == 2  # its earlier turn came along, from the store
        assert _route_replica(second) == 0
        wait_until(lambda: not psutil.pid_exists(pid) or not _stopped(pid), "the paused one ended")
        detail = wait_until(
            _when(user, agent_id, lambda states: states == ["ready", "ready"]),
            "the pool back at two ready replicas",
            SCALE_WAIT_S,
            interval_s=0.5,
        )
        indices = [r["index"] for r in detail["replicas"]]
        assert scaled not in indices and 0 in indices  # a new index, never the old one

        base_pid = _replica_pid(agent_id, 0)
        os.kill(base_pid, signal.SIGSTOP)
        paused.append(base_pid)
        for sid, n in ((first, 2), (second, 3)):
            assert _resend_until_ok(user, sid, "and now?")["index"] == n
            assert _route_replica(sid) == 0
        restarted = wait_until(
            lambda: (p := _replica_pid(agent_id, 0)) != base_pid and p,
            "replica 0 restarted under its name",
            SCALE_WAIT_S,
        )
        assert restarted != base_pid
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    user.ok("DELETE", f"/v1/agents/{agent_id}")
