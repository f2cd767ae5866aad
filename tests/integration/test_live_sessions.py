"""Live sessions over real HTTP against real Serve: resumable streams (``Last-Event-ID``), a
resume after the replica running the turn is killed, double-texting (enqueue, interrupt) and
background turns."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from actors import NAMESPACE, InvalidRequestError, SessionBusyError, replica_name
from actors.loop import INTERRUPTED_TOOL
from cluster.loadtest.sse import Event, SseParser

from .api_client import HELD_TURN, TIMEOUT_S, Client, new_session, new_user, release_held_turns
from .conftest import ApiServer
from .waiting import processes_with, wait_until, wait_until_async

WAIT_S = 30.0


@pytest.fixture(scope="module")
def bob(api_server: ApiServer) -> Iterator[Client]:
    admin = Client(api_server.base_url, api_server.admin_key)
    client = new_user(admin, api_server, requests_per_minute=5_000)
    yield client
    client.http.close()
    admin.http.close()


@pytest.fixture
def agent(bob: Client) -> Iterator[dict[str, Any]]:
    """An agent of its own per test: killing its replica touches no other test."""
    created = bob.ok("POST", "/v1/agents", 201, json={"tools": ["bash"]})
    yield dict(created)
    bob.ok("DELETE", f"/v1/agents/{created['id']}")


class EventSource:
    """What a browser's ``EventSource`` does with ids (HTML, server-sent events): it keeps the
    id of the last event that had one and sends it as ``Last-Event-ID`` when it reconnects."""

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self.last_id: str | None = None

    def absorb(self, events: list[Event]) -> list[Event]:
        for event in events:
            if event.id is not None:
                self.last_id = event.id
        return events

    def reconnect(self) -> list[Event]:
        headers = {} if self.last_id is None else {"Last-Event-ID": self.last_id}
        response = self.client.request(
            "GET", f"/v1/sessions/{self.session_id}/events", headers=headers
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        return self.absorb(SseParser().feed(response.content))


def _post_stream(client: Client, session_id: str, content: str, stop: str) -> list[Event]:
    """Streams a turn and hangs up after its first ``stop`` event."""
    parser, seen = SseParser(), []
    with client.http.stream(
        "POST",
        f"/v1/sessions/{session_id}/messages",
        json={"content": content, "stream": True},
        headers={"Authorization": f"Bearer {client.key}"},
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            seen += parser.feed(chunk)
            if any(e.type == stop for e in seen):
                return seen
    raise AssertionError(f"the stream ended before {stop}: {seen}")


def _replay(client: Client, session_id: str, after: int) -> list[Event]:
    response = client.request("GET", f"/v1/sessions/{session_id}/events?after={after}")
    assert response.status_code == 200, response.text
    return SseParser().feed(response.content)


def _ids(events: list[Event]) -> list[int]:
    return [int(e.id) for e in events if e.id is not None]


def test_a_cut_stream_resumes_with_last_event_id(
    bob: Client, agent: dict[str, Any], workspaces_root: Path, api_server: ApiServer
) -> None:
    sid = new_session(bob, agent["id"])
    source = EventSource(bob, sid)
    first = source.absorb(_post_stream(bob, sid, HELD_TURN, stop="tool_use"))
    release_held_turns(workspaces_root, agent["id"], [sid])
    rest = source.reconnect()  # follows the running turn live to its end
    assert rest[0].type == "tool_result" and rest[-1].type == "turn_end"
    whole = first + rest
    ids = _ids(whole)
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # every event once, in order
    assert [e.type for e in whole] == [e.type for e in _replay(bob, sid, ids[0] - 1)]
    assert source.reconnect() == []  # nothing after the last: the answer comes at once
    assert rest[-1].data["stop_reason"] == "end_turn"
    bad = bob.request("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400
    missing = bob.request("GET", "/v1/sessions/ses_missing/events")
    assert missing.status_code == 404
    stranger = new_user(Client(bob.http.base_url, api_server.admin_key), api_server)
    turn_id = first[0].data["turn_id"]
    for path in (f"/v1/sessions/{sid}/events", f"/v1/sessions/{sid}/turns/{turn_id}"):
        assert stranger.request("GET", path).status_code == 404  # another user's: not found
    assert bob.ok("GET", f"/v1/sessions/{sid}/turns/{turn_id}")["status"] == "completed"


def _kill(agent_id: str) -> None:
    """Ends the replica's process; Ray starts it again under its name (its sessions reload)."""
    ray.kill(ray.get_actor(replica_name(agent_id, 0), namespace=NAMESPACE), no_restart=False)


def _resume_until_answered(source: EventSource) -> list[Event]:
    """Reconnects until the restarted replica answers (before, the API's answer is an
    ``unavailable`` error event); never an empty answer."""
    answers: list[list[Event]] = []

    def answered() -> list[Event] | None:
        events = source.reconnect()
        answers.append(events)
        assert events, "a resume ended silently"
        last = events[-1]
        if last.type == "error" and last.data["type"] == "unavailable":
            return None
        return events

    return wait_until(answered, "the restarted replica to answer", WAIT_S, interval_s=0.5)


def test_a_resume_after_the_replica_is_killed_is_never_silent(
    bob: Client, agent: dict[str, Any], workspaces_root: Path
) -> None:
    committed, lost = new_session(bob, agent["id"]), new_session(bob, agent["id"])
    # One turn commits before the kill, its client gone after its tool began.
    done = EventSource(bob, committed)
    done.absorb(_post_stream(bob, committed, HELD_TURN, stop="tool_use"))
    release_held_turns(workspaces_root, agent["id"], [committed])
    wait_until(
        lambda: bob.ok("GET", f"/v1/sessions/{committed}/messages")["version"] == 1,
        "the first turn to commit",
        WAIT_S,
    )
    # The other is running when its replica dies.
    cut = EventSource(bob, lost)
    cut.absorb(_post_stream(bob, lost, HELD_TURN, stop="tool_use"))
    _kill(agent["id"])
    outcome = _resume_until_answered(done)  # the committed outcome, from the store
    assert outcome[0].type == "tool_result" and outcome[-1].type == "turn_end"
    assert outcome[-1].data["index"] == 1
    lost_answer = _resume_until_answered(cut)
    assert [e.type for e in lost_answer] == ["error"]
    assert lost_answer[0].data["type"] == "turn_lost" and lost_answer[0].data["retryable"]
    assert lost_answer[0].id is None
    # The session goes on, numbering its events above the lost turn's.
    again = bob.ok("POST", f"/v1/sessions/{lost}/messages", json={"content": "again"})
    assert again["index"] == 1
    replayed = _replay(bob, lost, 0)
    assert min(_ids(replayed)) > int(cut.last_id or 0)


async def _queued_turns(agent_id: str) -> int:
    replica = ray.get_actor(replica_name(agent_id, 0), namespace=NAMESPACE)
    return int((await replica.stats.remote())["queued_turns"])


async def test_enqueue_runs_three_quick_messages_in_order(
    bob: Client, agent: dict[str, Any], workspaces_root: Path
) -> None:
    sid = new_session(bob, agent["id"])
    path = f"/v1/sessions/{sid}/messages"
    held = bob.ok("POST", path, 202, json={"content": HELD_TURN, "background": True})
    assert held["status"] == "running"
    busy = bob.request("POST", path, json={"content": "refused"})
    assert busy.status_code == 409 and busy.json()["error"]["type"] == "session_busy"
    headers = {"Authorization": f"Bearer {bob.key}"}
    async with httpx.AsyncClient(base_url=bob.http.base_url, timeout=TIMEOUT_S) as http:
        sends = []
        for position, text in enumerate(("one", "two", "three"), start=1):
            body = {"content": text, "if_busy": "enqueue"}
            sends.append(asyncio.ensure_future(http.post(path, json=body, headers=headers)))

            async def queued(count: int = position) -> bool:
                return await _queued_turns(agent["id"]) == count

            await wait_until_async(queued, f"{position} queued turns", WAIT_S)
        release_held_turns(workspaces_root, agent["id"], [sid])
        answers = [await s for s in sends]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["index"] for a in answers] == [2, 3, 4]
    page = bob.ok("GET", path)
    assert [t["messages"][0]["content"] for t in page["turns"][1:]] == ["one", "two", "three"]


def test_interrupt_stops_a_sleeping_tool_within_two_seconds(
    bob: Client, agent: dict[str, Any]
) -> None:
    sid = new_session(bob, agent["id"])
    marker = uuid.uuid4().hex
    command = f'[[tool bash {{"command": "sleep 30; echo {marker}"}}]]'
    parser, events = SseParser(), []
    interrupted_at = 0.0
    answer: dict[str, Any] = {}
    with bob.http.stream(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"content": command, "stream": True},
        headers={"Authorization": f"Bearer {bob.key}"},
    ) as response:
        for chunk in response.iter_raw():
            events += parser.feed(chunk)
            if not interrupted_at and any(e.type == "tool_use" for e in events):
                wait_until(lambda: processes_with(marker.encode()), "the tool to run", WAIT_S)
                interrupted_at = time.monotonic()
                body = {"content": "stop that", "if_busy": "interrupt"}
                sent = bob.request("POST", f"/v1/sessions/{sid}/messages", json=body)
                assert sent.status_code == 200, sent.text
                answer = sent.json()
    stopped_s = time.monotonic() - interrupted_at
    # The bound: the tool would otherwise have run 30 s.
    assert stopped_s < 2.0, f"the interrupted turn took {stopped_s:.1f} s to stop"
    assert not processes_with(marker.encode())
    assert events[-1].type == "turn_end" and events[-1].data["stop_reason"] == "interrupted"
    assert answer["index"] == 2 and answer["stop_reason"] == "end_turn"
    turns = bob.ok("GET", f"/v1/sessions/{sid}/messages")["turns"]
    assert [t["stop_reason"] for t in turns] == ["interrupted", "end_turn"]
    assert turns[0]["messages"][-1]["content"][0]["content"] == INTERRUPTED_TOOL
    assert turns[1]["messages"][0]["content"] == "stop that"


def test_a_background_turn_finishes_with_no_client(bob: Client, agent: dict[str, Any]) -> None:
    sid = new_session(bob, agent["id"])
    path = f"/v1/sessions/{sid}/messages"
    content = '[[tool bash {"command": "sleep 1; echo unattended"}]]'
    accepted = bob.ok("POST", path, 202, json={"content": content, "background": True})
    assert accepted["session_id"] == sid and accepted["status"] in ("queued", "running")
    turn_path = f"/v1/sessions/{sid}/turns/{accepted['turn_id']}"

    def finished() -> dict[str, Any] | None:
        status = bob.ok("GET", turn_path)
        return status if status["status"] == "completed" else None

    status = wait_until(finished, "the background turn", WAIT_S, interval_s=0.2)
    assert status["turn"]["index"] == 1 and status["turn"]["turn_id"] == accepted["turn_id"]
    replayed = _replay(bob, sid, 0)
    assert replayed[0].type == "turn_start" and replayed[-1].type == "turn_end"
    result = next(e for e in replayed if e.type == "tool_result")
    assert result.data["content"] == "unattended\n"
    assert bob.request("GET", f"/v1/sessions/{sid}/turns/turn_nope").status_code == 404
    both = bob.request("POST", path, json={"content": "x", "background": True, "stream": True})
    assert both.status_code == 422
    odd = bob.request("POST", path, json={"content": "x", "if_busy": "sometimes"})
    assert odd.status_code == 422 and "if_busy" in odd.text


def test_batch_jobs_have_the_same_choices(
    bob: Client, agent: dict[str, Any], workspaces_root: Path
) -> None:
    replica = ray.get_actor(replica_name(agent["id"], 0), namespace=NAMESPACE)
    sid = ray.get(replica.open_session.remote(owner=bob.user_id), timeout=TIMEOUT_S)["id"]
    held = ray.get(replica.start.remote(sid, HELD_TURN), timeout=TIMEOUT_S)
    assert held["status"] == "running"
    queued = ray.get(replica.start.remote(sid, "after it", if_busy="enqueue"), timeout=TIMEOUT_S)
    assert queued["status"] == "queued"
    with pytest.raises(SessionBusyError):
        ray.get(replica.send.remote(sid, "refused"), timeout=TIMEOUT_S)
    with pytest.raises(InvalidRequestError, match="if_busy"):
        ray.get(replica.send.remote(sid, "odd", if_busy="sometimes"), timeout=TIMEOUT_S)
    release_held_turns(workspaces_root, agent["id"], [sid])
    followed = [ray.get(ref, timeout=TIMEOUT_S) for ref in replica.events.remote(sid, None, 0)]
    ends = [e["data"]["turn_id"] for e in followed if e["type"] == "turn_end"]
    assert ends == [held["turn_id"], queued["turn_id"]]  # followed live until idle
    status = ray.get(replica.turn_status.remote(sid, queued["turn_id"]), timeout=TIMEOUT_S)
    assert status["status"] == "completed" and status["turn"]["index"] == 2


@ray.remote(num_cpus=0)
class _Slow:
    async def work(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"


@ray.remote(num_cpus=0)
class _Spawner:
    """Streams like ``AgentActor.stream``: a task it spawns makes a Ray call that outlives the
    stream's caller."""

    def __init__(self, slow: Any) -> None:
        self.slow, self.outcomes, self.calling = slow, [], False

    async def stream(self, detached: bool) -> Any:
        from actors.host import _detached

        async def turn() -> None:
            try:
                call = self.slow.work.remote(1.5)
                self.calling = True
                self.outcomes.append(await call)
            except ray.exceptions.RayError as e:  # what the test reports
                self.outcomes.append(type(e).__name__)

        if detached:
            _detached(turn(), {"session_id": "s"})
        else:
            self.task = asyncio.create_task(turn())
        for i in range(100):
            yield i
            await asyncio.sleep(0.1)

    async def in_flight(self) -> bool:
        return self.calling

    async def outcome(self) -> list[str]:
        await wait_until_async(lambda: bool(self.outcomes), "the call", WAIT_S)
        return list(self.outcomes)


@ray.remote(num_cpus=0)
class _Caller:
    async def request(self, spawner: Any, detached: bool) -> None:
        async for ref in spawner.stream.remote(detached):
            await ref


def test_a_turn_outlives_a_caller_cancelled_recursively(api_server: ApiServer) -> None:
    """Serve cancels the request of an HTTP client that hung up, recursively: in Ray 2.60 that
    cancels every call made by a task that copied the streaming task's context (the upstream
    behaviour, pinned here), and a turn's store calls with them unless it runs detached."""
    slow = _Slow.remote()
    for detached, expected in ((False, "TaskCancelledError"), (True, "done")):
        spawner, caller = _Spawner.remote(slow), _Caller.remote()
        request = caller.request.remote(spawner, detached)
        wait_until(
            lambda s=spawner: ray.get(s.in_flight.remote(), timeout=TIMEOUT_S),
            "the call in flight",
            WAIT_S,
        )
        ray.cancel(request, recursive=True)
        (outcome,) = ray.get(spawner.outcome.remote(), timeout=TIMEOUT_S)
        assert expected in outcome
        for actor in (spawner, caller):
            ray.kill(actor)
    ray.kill(slow)
