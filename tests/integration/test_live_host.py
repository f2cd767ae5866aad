"""Live sessions in the runtime without Ray: double-texting (reject, enqueue, interrupt),
background turns and resumable events, on ``SessionHost`` with real tools, the SQLite store and
the emulator. A second host on the same store stands for the replica that takes a session over
after the first one died."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from actors import SessionBusyError, SessionHost
from actors.loop import INTERRUPTED_TOOL
from hyperfleet.errors import (
    InvalidRequestError,
    SessionMovedError,
    StoreError,
    TurnQueueFullError,
)

from .conftest import HostFactory
from .waiting import processes_with, wait_until_async

WAIT_S = 10.0
SLOW_TEXT = {"x-emulator-tps": "40", "x-emulator-output-tokens": "200"}  # about 5 s of text


async def _busy(host: SessionHost, queued: int = 0) -> None:
    await wait_until_async(
        lambda: host.stats()["busy_sessions"] == 1 and host.stats()["queued_turns"] == queued,
        f"a running turn and {queued} queued",
        WAIT_S,
        interval_s=0.01,
    )


async def _hang_up_after(
    host: SessionHost, sid: str, content: str, count: int
) -> list[dict[str, Any]]:
    """Streams a turn and hangs up after its first ``count`` events; the turn runs on."""
    seen: list[dict[str, Any]] = []
    stream = host.stream(sid, content)
    async for item in stream:
        seen.append(item)
        if len(seen) == count:
            break
    await stream.aclose()
    return seen


async def _collect(stream: Any) -> list[dict[str, Any]]:
    return [item async for item in stream]


def _user_texts(page: dict[str, Any]) -> list[str]:
    return [t["messages"][0]["content"] for t in page["turns"]]


async def test_enqueued_messages_run_in_order_and_a_full_queue_is_429(
    make_host: HostFactory,
) -> None:
    host = make_host(max_queued_turns=2)
    sid = (await host.open_session("alice"))["id"]
    first = asyncio.ensure_future(host.send(sid, '[[tool bash {"command": "sleep 1"}]]'))
    await _busy(host)
    with pytest.raises(SessionBusyError):
        await host.send(sid, "rejected")
    queued = []
    for text in ("two", "three"):
        queued.append(asyncio.ensure_future(host.send(sid, text, if_busy="enqueue")))
        await _busy(host, queued=len(queued))
    with pytest.raises(TurnQueueFullError):
        await host.send(sid, "four", if_busy="enqueue")
    turns = [await first, *[await q for q in queued]]
    assert [t["index"] for t in turns] == [1, 2, 3]
    page = await host.transcript(sid)
    assert _user_texts(page)[1:] == ["two", "three"]


async def test_a_queued_duplicate_joins_the_queued_turn(make_host: HostFactory) -> None:
    host = make_host()
    sid = (await host.open_session("alice"))["id"]
    first = asyncio.ensure_future(host.send(sid, '[[tool bash {"command": "sleep 1"}]]'))
    await _busy(host)
    twins = [
        asyncio.ensure_future(host.send(sid, "once", "key-1", if_busy="enqueue")) for _ in range(3)
    ]
    await first
    answers = [await t for t in twins]
    assert len({a["turn_id"] for a in answers}) == 1
    assert sorted(a["replayed"] for a in answers) == [False, True, True]
    assert (await host.transcript(sid))["version"] == 2


async def test_interrupt_kills_the_tool_and_commits_the_interrupted_turn(
    make_host: HostFactory,
) -> None:
    host = make_host()
    sid = (await host.open_session("alice"))["id"]
    marker = uuid.uuid4().hex
    command = f"sleep 30; echo {marker}"
    events: list[dict[str, Any]] = []

    async def follow() -> None:
        async for item in host.stream(sid, f'[[tool bash {{"command": "{command}"}}]]'):
            events.append(item)

    streaming = asyncio.ensure_future(follow())
    await wait_until_async(
        lambda: any(e["type"] == "tool_use" for e in events) and processes_with(marker.encode()),
        "the tool to run",
        WAIT_S,
        interval_s=0.01,
    )
    second = await host.send(sid, "never mind", if_busy="interrupt")
    await streaming
    assert not processes_with(marker.encode())
    assert second["index"] == 2 and second["stop_reason"] == "end_turn"
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["tool_result", "turn_end"]
    assert events[-2]["data"] == {
        "tool_use_id": events[kinds.index("tool_use")]["data"]["id"],
        "content": INTERRUPTED_TOOL,
        "is_error": True,
    }
    assert events[-1]["data"]["stop_reason"] == "interrupted"
    interrupted = (await host.transcript(sid))["turns"][0]
    assert interrupted["stop_reason"] == "interrupted"
    assert interrupted["messages"][-1]["content"][0]["content"] == INTERRUPTED_TOOL
    assert interrupted["usage"]["input_tokens"] > 0  # its model call is metered


async def test_interrupting_a_reply_keeps_what_it_said(make_host: HostFactory) -> None:
    host = make_host(headers=SLOW_TEXT)
    sid = (await host.open_session("alice"))["id"]
    events: list[dict[str, Any]] = []

    async def follow() -> None:
        async for item in host.stream(sid, "tell me a long story"):
            events.append(item)

    streaming = asyncio.ensure_future(follow())
    await wait_until_async(
        lambda: any(e["type"] == "text_delta" for e in events), "text", WAIT_S, interval_s=0.01
    )
    await host.send(sid, "stop", if_busy="interrupt")
    await streaming
    turn = (await host.transcript(sid))["turns"][0]
    said = "".join(e["data"]["text"] for e in events if e["type"] == "text_delta")
    assert turn["stop_reason"] == "interrupted"
    assert turn["content"][0]["text"].startswith(said)
    assert turn["usage"]["output_tokens"] > 0  # estimated from what was streamed
    assert turn["messages"][-1]["role"] == "assistant"


async def test_a_background_turn_runs_with_no_one_attached(make_host: HostFactory) -> None:
    host = make_host()
    sid = (await host.open_session("alice"))["id"]
    accepted = await host.start(sid, '[[tool bash {"command": "sleep 0.5; echo bg"}]]')
    assert accepted["status"] == "running"
    queued = await host.start(sid, "next", if_busy="enqueue")
    assert queued["status"] == "queued"
    with pytest.raises(SessionBusyError):
        await host.start(sid, "refused")
    status = await host.turn_status(sid, queued["turn_id"])
    assert status["status"] in ("queued", "running")

    async def done() -> bool:
        found = await host.turn_status(sid, queued["turn_id"])
        return bool(found["status"] == "completed")

    await wait_until_async(done, "the queued background turn", WAIT_S)
    first = await host.turn_status(sid, accepted["turn_id"])
    assert first["status"] == "completed" and first["turn"]["index"] == 1
    replayed = await _collect(host.events(sid, after=0))
    assert [e["data"]["turn_id"] for e in replayed if e["type"] == "turn_start"] == [
        accepted["turn_id"],
        queued["turn_id"],
    ]
    with pytest.raises(Exception, match="no turn"):
        await host.turn_status(sid, "turn_unknown")


async def test_a_cut_stream_resumes_with_exactly_the_rest(make_host: HostFactory) -> None:
    host = make_host(headers=SLOW_TEXT)
    sid = (await host.open_session("alice"))["id"]
    seen = await _hang_up_after(host, sid, "a story", 3)
    rest = await _collect(host.events(sid, after=seen[-1]["seq"]))
    whole = seen + rest
    assert rest[-1]["type"] == "turn_end"
    ids = [e["seq"] for e in whole]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # every event once, in order
    committed = (await host.transcript(sid))["turns"][0]
    assert committed["turn_id"] == whole[0]["data"]["turn_id"]
    assert await _collect(host.events(sid, after=ids[-1])) == []  # nothing after: at once
    with pytest.raises(InvalidRequestError):
        await _collect(host.events(sid, after=ids[-1] + 10**6))


async def test_events_replay_from_the_store_on_another_replica(make_host: HostFactory) -> None:
    first = make_host()
    sid = (await first.open_session("alice"))["id"]
    streamed = [await _collect(first.stream(sid, f"turn {i}")) for i in range(3)]
    takeover = make_host()  # same store: the replica that loads the session next
    after = streamed[0][-1]["seq"]
    replayed = await _collect(takeover.events(sid, after=after))
    assert replayed == streamed[1] + streamed[2]
    # The new owner numbers its events after every id the first could have sent.
    later = await _collect(takeover.stream(sid, "turn 3"))
    assert later[0]["seq"] > first._sessions[sid].seq_limit


async def test_a_turn_lost_with_its_replica_is_an_error_on_resume(make_host: HostFactory) -> None:
    doomed = make_host(headers=SLOW_TEXT)
    sid = (await doomed.open_session("alice"))["id"]
    await _collect(doomed.stream(sid, "committed"))
    seen = await _hang_up_after(doomed, sid, "lost", 2)
    takeover = make_host()  # the doomed replica's turn never commits
    resumed = await _collect(takeover.events(sid, after=seen[-1]["seq"]))
    assert [e["type"] for e in resumed] == ["error"]
    assert resumed[0]["data"]["type"] == "turn_lost" and resumed[0]["data"]["retryable"]
    assert resumed[0]["seq"] is None  # it does not move the client's Last-Event-ID
    # The session goes on there; its next turn's ids are above the lost turn's.
    after = await _collect(takeover.stream(sid, "again"))
    assert after[0]["seq"] > seen[-1]["seq"]


class FaultyStore:
    """The host's real store, with faults a test switches on: a ``reserve_seq`` that waits for
    the test, and a commit that fails before or after it writes (a reply lost on the way)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reserve_gate: asyncio.Event | None = None
        self.commit_gate: asyncio.Event | None = None
        self.commit_fault: str | None = None  # "before" or "after" writing, once

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def reserve_seq(self, session_id: str, count: int) -> int:
        if self.reserve_gate is not None:
            await self.reserve_gate.wait()
        return int(await self.inner.reserve_seq(session_id, count))

    async def commit_turn(self, turn: Any, expected_version: int, usage: Any = None) -> None:
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        fault, self.commit_fault = self.commit_fault, None
        if fault == "before":
            raise StoreError("the store went away")
        await self.inner.commit_turn(turn, expected_version, usage)
        if fault == "after":
            raise StoreError("the reply was lost")


def _faulty(host: SessionHost) -> FaultyStore:
    store = FaultyStore(host.store)
    host.store = store  # type: ignore[assignment]
    return store


async def test_an_interrupt_before_the_loop_begins_commits_the_message(
    make_host: HostFactory,
) -> None:
    host = make_host()
    store = _faulty(host)
    sid = (await host.open_session("alice"))["id"]
    session = host._sessions[sid]
    session.seq_limit = session.seq + 1  # turn_start must reserve ids first: it waits there
    store.reserve_gate = asyncio.Event()
    first = asyncio.ensure_future(host.send(sid, "the first"))
    await _busy(host)
    second = asyncio.ensure_future(host.send(sid, "the second", if_busy="interrupt"))
    await _busy(host, queued=1)
    store.reserve_gate.set()
    cut, after = await first, await second
    assert cut["stop_reason"] == "interrupted" and after["index"] == 2
    turns = (await host.transcript(sid))["turns"]
    assert turns[0]["messages"] == [{"role": "user", "content": "the first"}]


async def test_a_second_interrupt_while_the_first_is_handled_cuts_the_first(
    make_host: HostFactory,
) -> None:
    host = make_host(headers=SLOW_TEXT)
    sid = (await host.open_session("alice"))["id"]
    running = asyncio.ensure_future(host.send(sid, "a long story"))
    await _busy(host)
    store = _faulty(host)
    store.commit_gate = asyncio.Event()  # the interrupted turn's commit waits
    first = asyncio.ensure_future(host.send(sid, "stop", if_busy="interrupt"))
    await _busy(host, queued=1)
    await wait_until_async(
        lambda: host._sessions[sid].running.done(), "the cut", WAIT_S, interval_s=0.01
    )
    second = asyncio.ensure_future(host.send(sid, "stop now", if_busy="interrupt"))
    await _busy(host, queued=2)
    store.commit_gate.set()
    answers = [await running, await first, await second]
    assert [a["stop_reason"] for a in answers] == ["interrupted", "interrupted", "end_turn"]


async def test_a_commit_whose_reply_was_lost_still_ends_in_turn_end(
    make_host: HostFactory,
) -> None:
    host = make_host()
    store = _faulty(host)
    sid = (await host.open_session("alice"))["id"]
    store.commit_fault = "after"
    events = await _collect(host.stream(sid, "hello"))
    assert events[-1]["type"] == "turn_end" and events[-1]["data"]["index"] == 1
    assert await _collect(host.events(sid, after=events[-1]["seq"])) == []


async def test_a_failed_commit_does_not_lose_the_turns_queued_behind_it(
    make_host: HostFactory,
) -> None:
    host = make_host()
    store = _faulty(host)
    sid = (await host.open_session("alice"))["id"]
    store.commit_fault = "before"
    failing = await host.start(sid, '[[tool bash {"command": "sleep 0.5"}]]')
    queued = await host.start(sid, "queued behind it", if_busy="enqueue")
    assert queued["status"] == "queued"

    async def settled() -> bool:
        found = await host.turn_status(sid, queued["turn_id"])
        return bool(found["status"] == "completed")

    await wait_until_async(settled, "the queued turn", WAIT_S)
    failed = await host.turn_status(sid, failing["turn_id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "store_unavailable"
    page = await host.transcript(sid)
    assert page["version"] == 1 and _user_texts(page) == ["queued behind it"]


async def test_a_lost_turn_is_reported_before_the_turns_that_followed(
    make_host: HostFactory,
) -> None:
    doomed = make_host(headers=SLOW_TEXT)
    sid = (await doomed.open_session("alice"))["id"]
    seen = await _hang_up_after(doomed, sid, "lost", 2)
    takeover = make_host()
    later = await _collect(takeover.stream(sid, "committed after it"))
    resumed = await _collect(takeover.events(sid, after=seen[-1]["seq"]))
    assert resumed[0]["type"] == "error" and resumed[0]["data"]["type"] == "turn_lost"
    assert resumed[1:] == later


async def test_an_interrupt_passes_a_full_queue(make_host: HostFactory) -> None:
    host = make_host(max_queued_turns=0)
    sid = (await host.open_session("alice"))["id"]
    running = asyncio.ensure_future(host.send(sid, '[[tool bash {"command": "sleep 30"}]]'))
    await _busy(host)
    with pytest.raises(TurnQueueFullError):
        await host.send(sid, "wait", if_busy="enqueue")
    answer = await host.send(sid, "stop", if_busy="interrupt")
    assert (await running)["stop_reason"] == "interrupted" and answer["index"] == 2


async def test_a_draining_replica_queues_nothing_and_refuses_what_waits(
    make_host: HostFactory,
) -> None:
    host = make_host()
    sid = (await host.open_session("alice"))["id"]
    running = await host.start(sid, '[[tool bash {"command": "sleep 2"}]]')
    waiting = await host.start(sid, "waiting", if_busy="enqueue")
    draining = asyncio.ensure_future(host.drain(0.5))
    await wait_until_async(lambda: host.draining, "the drain", WAIT_S, interval_s=0.01)
    with pytest.raises(SessionMovedError):
        await host.start(sid, "too late", if_busy="enqueue")
    with pytest.raises(SessionBusyError):  # refused by the running turn, as before
        await host.send(sid, "busy")
    await draining
    refused = await host.turn_status(sid, waiting["turn_id"])
    assert refused["status"] == "failed" and refused["error"]["retryable"]

    async def finished() -> bool:
        found = await host.turn_status(sid, running["turn_id"])
        return bool(found["status"] == "completed")

    await wait_until_async(finished, "the running turn", WAIT_S)
