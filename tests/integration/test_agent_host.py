"""The agent runtime without Ray: ``SessionHost`` + ``AgentLoop`` + real tools + the SQLite store,
talking to the emulator over HTTP with the official client."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import anthropic
import pytest

from actors import (
    AgentSpec,
    CapacityError,
    CircuitOpenError,
    IdempotencyConflictError,
    RuntimeConfig,
    SessionBusyError,
    SessionHost,
    SqliteSessionStore,
    StaleSessionError,
    UpstreamError,
)
from actors.actor import build_host
from actors.model_client import PendingClient
from hyperfleet.processes import stop

from .conftest import EmulatorServer, HostFactory, start_emulator
from .waiting import processes_with, wait_until_async

TURN_START_WAIT_S = 5.0


# The fault tests run on both of the model client's transports (``model_transport``);
# the rest on the default, aiohttp.
BOTH_TRANSPORTS = pytest.mark.parametrize("make_host", ["aiohttp", "httpx"], indirect=True)


async def _turns_running(host: SessionHost, count: int) -> None:
    """Waits until ``count`` of the host's sessions are running a turn: in this process, a few
    steps of the event loop, so it is polled often."""
    await wait_until_async(
        lambda: host.stats()["busy_sessions"] == count,
        f"{count} running turns",
        TURN_START_WAIT_S,
        interval_s=0.01,
    )


def _model_calls(emulator: EmulatorServer) -> int:
    return int(emulator.stats()["requests"].get("POST /v1/messages", 0))


def _text(turn: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in turn["content"])


async def test_sessions_open_while_the_model_client_starts(
    emulator: EmulatorServer, tmp_path: Path, workspaces_root: Path
) -> None:
    release = threading.Event()

    def build() -> anthropic.AsyncAnthropic:
        assert release.wait(30)
        return anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key=emulator.api_key)

    pending = PendingClient(build, "a1-0")
    store = SqliteSessionStore(tmp_path / "sessions.db")
    runtime = RuntimeConfig(workspaces=str(workspaces_root))
    host = build_host("a1", AgentSpec(), runtime, pending, store=store)
    try:
        sid = (await host.open_session("alice"))["id"]  # served before the client exists
        turn = asyncio.create_task(host.send(sid, "Hello"))
        await _turns_running(host, 1)
        assert not turn.done() and pending.state == "loading"
        release.set()
        assert _text(await asyncio.wait_for(turn, 30)).startswith("You said: Hello")
        assert [t["index"] for t in (await host.transcript(sid))["turns"]] == [1]
    finally:
        release.set()
        await pending.close()
        store.close()


async def test_multi_turn_conversation_with_parallel_tools(make_host: HostFactory) -> None:
    host = make_host(system="You are a test agent.")
    session = await host.open_session("alice")
    sid = session["id"]
    first = await host.send(sid, "Hello there")
    assert first["stop_reason"] == "end_turn"
    assert _text(first).startswith("You said: Hello there.")
    directive = (
        '[[tool write_file {"path": "notes/a.txt", "content": "alpha"}]] '
        '[[tool bash {"command": "echo beta > b.txt && echo made b"}]]'
    )
    second = await host.send(sid, directive)
    assert second["stop_reason"] == "end_turn"
    assert "wrote 5 bytes" in _text(second) and "made b" in _text(second)
    third = await host.send(sid, '[[tool bash {"command": "cat notes/a.txt b.txt"}]]')
    assert _text(third) == 'The tool bash returned: "alphabeta".'
    listing = await host.send(sid, "[[tool list_files {}]]")
    assert "notes/" in _text(listing) and "b.txt" in _text(listing)
    transcript = await host.transcript(sid)
    assert transcript["version"] == 4
    assert [t["index"] for t in transcript["turns"]] == [1, 2, 3, 4]
    second_turn = transcript["turns"][1]["messages"]
    assert [m["role"] for m in second_turn] == ["user", "assistant", "user", "assistant"]
    assert len([b for b in second_turn[1]["content"] if b["type"] == "tool_use"]) == 2
    assert first["usage"]["input_tokens"] > 0 and first["cost_usd"] > 0
    # The model saw the history: the fourth call's prompt is longer than the first's.
    assert (
        listing["usage"]["input_tokens"] + listing["usage"]["cache_read_input_tokens"]
        > first["usage"]["input_tokens"]
    )


async def test_max_turns_stops_a_tool_loop(make_host: HostFactory, tmp_path: Path) -> None:
    host = make_host(max_turns=3)
    sid = (await host.open_session("alice"))["id"]
    # A tool whose output is the directive again keeps the model calling it.
    await host.send(
        sid,
        "[[tool write_file "
        + json.dumps({"path": "loop.txt", "content": '[[tool read_file {"path": "loop.txt"}]]'})
        + "]]",
    )
    turn = await host.send(sid, '[[tool read_file {"path": "loop.txt"}]]')
    assert turn["stop_reason"] == "max_turns"
    messages = (await host.transcript(sid))["turns"][-1]["messages"]
    assert sum(1 for m in messages if m["role"] == "assistant") == 3


async def test_workspace_escape_is_a_tool_error(make_host: HostFactory) -> None:
    host = make_host()
    sid = (await host.open_session("alice"))["id"]
    turn = await host.send(sid, '[[tool read_file {"path": "../../../../etc/passwd"}]]')
    assert "failed with" in _text(turn) and "outside the session workspace" in _text(turn)
    link = await host.send(sid, '[[tool bash {"command": "ln -s /etc/hostname h && echo ok"}]]')
    assert "returned" in _text(link)
    followed = await host.send(sid, '[[tool read_file {"path": "h"}]]')
    assert "is a symlink" in _text(followed) and "failed with" in _text(followed)
    failing = await host.send(sid, '[[tool bash {"command": "exit 3"}]]')
    assert "failed with" in _text(failing) and "exit code 3" in _text(failing)


async def test_bash_timeout_is_a_tool_error(make_host: HostFactory) -> None:
    host = make_host(tool_timeout_s=1)
    sid = (await host.open_session("alice"))["id"]
    turn = await host.send(sid, '[[tool bash {"command": "sleep 30"}]]')
    assert "timed out after 1 s" in _text(turn)


@BOTH_TRANSPORTS
@pytest.mark.parametrize("fault", ["429", "529", "500"])
async def test_status_faults_end_in_a_clean_error(make_host: HostFactory, fault: str) -> None:
    host = make_host(headers={"x-emulator-fault": fault})
    sid = (await host.open_session("alice"))["id"]
    with pytest.raises(UpstreamError):
        await host.send(sid, "hello")
    assert (await host.transcript(sid))["version"] == 0


@BOTH_TRANSPORTS
@pytest.mark.parametrize("fault", ["midstream", "drop"])
async def test_stream_fault_before_content_is_retried(
    make_host: HostFactory, emulator: EmulatorServer, fault: str
) -> None:
    # Fails right after message_start on every attempt: the loop retries, then gives up cleanly.
    host = make_host(headers={"x-emulator-fault": fault, "x-emulator-fault-after": "1"})
    sid = (await host.open_session("alice"))["id"]
    before = _model_calls(emulator)
    with pytest.raises(UpstreamError, match="failed 3 times"):
        await host.send(sid, "hello")
    assert _model_calls(emulator) - before == 3
    assert (await host.transcript(sid))["version"] == 0


@BOTH_TRANSPORTS
async def test_random_stream_faults_are_retried_to_success(
    tmp_path: Path, make_host: HostFactory
) -> None:
    faults = ["--fault-429", "0.1", "--fault-529", "0.1", "--fault-500", "0.1"]
    faults += ["--fault-drop", "0.15", "--fault-midstream", "0.15", "--fault-after-events", "1"]
    process, flaky = start_emulator(
        tmp_path / "flaky.log", *faults, "--seed", "1", "--retry-after-ms", "10"
    )
    try:
        host = make_host()
        host.loop.client = host.loop.client.with_options(
            base_url=flaky.base_url, api_key=flaky.api_key
        )
        sid = (await host.open_session("alice"))["id"]
        for i in range(6):  # the seeded fault sequence hits every kind, each retried away
            turn = await host.send(sid, f"message {i}")
            assert turn["index"] == i + 1
        struck = flaky.stats()["faults"]
        assert set(struck) == {"429", "529", "500", "midstream", "drop"}, struck
        assert [t["index"] for t in (await host.transcript(sid))["turns"]] == list(range(1, 7))
    finally:
        stop(process)


@BOTH_TRANSPORTS
@pytest.mark.parametrize("fault", ["midstream", "drop"])
async def test_stream_fault_after_content_ends_turn_uncommitted(
    make_host: HostFactory, fault: str
) -> None:
    host = make_host()
    sid = (await host.open_session("alice"))["id"]
    await host.send(sid, "first")
    broken = make_host(headers={"x-emulator-fault": fault, "x-emulator-fault-after": "6"})
    events = [e async for e in broken.stream(sid, "second")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "turn_start" and kinds[-1] == "error"
    assert "text_delta" in kinds and "turn_end" not in kinds
    assert events[-1]["data"]["type"] == "upstream_error"
    assert events[-1]["data"]["retryable"] is True  # the client may resend it (same key)
    # Nothing of it was committed; the same message goes through on a healthy connection.
    assert (await broken.transcript(sid))["version"] == 1
    again = await host.send(sid, "second")
    assert again["index"] == 2


async def test_stream_events_are_ordered_and_coalesced(make_host: HostFactory) -> None:
    host = make_host(headers={"x-emulator-tps": "2000", "x-emulator-output-tokens": "200"})
    sid = (await host.open_session("alice"))["id"]
    events = [e async for e in host.stream(sid, '[[tool bash {"command": "echo hi"}]]')]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "turn_start" and kinds[-1] == "turn_end"
    assert kinds.index("tool_use") < kinds.index("tool_result")
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    plain = [e async for e in host.stream(sid, "a long answer please")]
    deltas = [e for e in plain if e["type"] == "text_delta"]
    # 200 tokens at 2,000 tokens/s take ~100 ms: coalesced into a handful of events, not 200.
    assert 1 <= len(deltas) < 40
    assert plain[0]["seq"] == seqs[-1] + 1
    end = plain[-1]["data"]
    assert end["stop_reason"] == "end_turn" and end["usage"]["output_tokens"] >= 200


async def test_eviction_and_reload(make_host: HostFactory) -> None:
    host = make_host(session_idle_ttl_s=1)
    sid = (await host.open_session("alice"))["id"]
    await host.send(sid, "remember me")
    host._clock = lambda: 1e12  # type: ignore[method-assign]
    assert host.evict_idle() == 1
    assert host.stats()["sessions"] == 0
    turn = await host.send(sid, "are you back?")
    assert turn["index"] == 2
    assert host.stats()["sessions"] == 1
    # A new replica of the same agent (say, after a restart) reloads it too.
    other = make_host()
    assert (await other.transcript(sid))["version"] == 2
    assert (await other.send(sid, "third"))["index"] == 3


async def test_idempotent_resend_makes_one_model_call(
    make_host: HostFactory, emulator: EmulatorServer
) -> None:
    host = make_host(headers={"x-emulator-ttft-ms": "200"})
    sid = (await host.open_session("alice"))["id"]
    before = _model_calls(emulator)
    turns = await asyncio.gather(*(host.send(sid, "once", idempotency_key="k1") for _ in range(50)))
    assert _model_calls(emulator) - before == 1
    assert len({t["turn_id"] for t in turns}) == 1
    again = await host.send(sid, "once", idempotency_key="k1")
    assert again["turn_id"] == turns[0]["turn_id"]
    assert _model_calls(emulator) - before == 1
    with pytest.raises(IdempotencyConflictError):
        await host.send(sid, "something else", idempotency_key="k1")
    assert (await host.transcript(sid))["version"] == 1


async def test_busy_session_and_capacity(make_host: HostFactory) -> None:
    host = make_host(max_sessions=2, headers={"x-emulator-ttft-ms": "300"})
    first = (await host.open_session("alice"))["id"]
    second = (await host.open_session("bob"))["id"]
    running = [asyncio.create_task(host.send(s, "slow")) for s in (first, second)]
    await _turns_running(host, 2)
    with pytest.raises(SessionBusyError):
        await host.send(first, "overlap")
    with pytest.raises(CapacityError) as info:
        await host.open_session("carol")  # both slots are running turns: nothing to evict
    assert info.value.retry_after_s and info.value.retry_after_s > 0
    assert [(await r)["index"] for r in running] == [1, 1]
    # Idle now: the least recently used session makes room, and stays in the store.
    await host.open_session("carol")
    assert host.stats()["sessions"] == 2
    assert (await host.send(first, "back"))["index"] == 2


async def test_stale_owner_cannot_commit(make_host: HostFactory) -> None:
    old = make_host()
    sid = (await old.open_session("alice"))["id"]
    await old.send(sid, "one")
    new = make_host()  # the session moved: the new owner commits turn 2
    assert (await new.send(sid, "two"))["index"] == 2
    with pytest.raises(StaleSessionError):
        await old.send(sid, "three from the stale owner")
    transcript = await new.transcript(sid)
    assert transcript["version"] == 2
    assert [t["messages"][0]["content"] for t in transcript["turns"]] == ["one", "two"]
    # The stale owner dropped its copy: its next access reloads and works.
    assert (await old.send(sid, "three"))["index"] == 3


async def test_closing_a_session_keeps_its_transcript_and_removes_its_files(
    make_host: HostFactory,
) -> None:
    host = make_host()
    sid = (await host.open_session("alice"))["id"]
    await host.send(sid, '[[tool write_file {"path": "notes.txt", "content": "x"}]]')
    root = host._sessions[sid].workspace.root
    assert (root / "notes.txt").exists()
    await host.close_session(sid)
    assert not root.exists()
    stored = await host.store.list_turns(sid)
    assert [t.index for t in stored] == [1]


async def test_drain_finishes_turns_and_hands_sessions_back(make_host: HostFactory) -> None:
    host = make_host(headers={"x-emulator-ttft-ms": "200"})
    sids = [(await host.open_session("alice"))["id"] for _ in range(3)]
    running = asyncio.create_task(host.send(sids[0], "finish me"))
    await _turns_running(host, 1)
    handed = await host.drain(deadline_s=10)
    assert sorted(handed) == sorted(sids)
    assert (await running)["index"] == 1
    with pytest.raises(CapacityError):
        await host.open_session("alice")


async def test_circuit_breaker_opens_after_consecutive_failures(
    make_host: HostFactory, emulator: EmulatorServer
) -> None:
    host = make_host(headers={"x-emulator-fault": "500"})
    sid = (await host.open_session("alice"))["id"]
    for _ in range(host.loop.breaker.failure_threshold):
        with pytest.raises(UpstreamError):
            await host.send(sid, "hello")
    before = _model_calls(emulator)
    with pytest.raises(CircuitOpenError) as info:
        await host.send(sid, "hello")
    assert info.value.retry_after_s and info.value.retry_after_s > 0
    assert _model_calls(emulator) == before  # failed fast, upstream untouched
    assert host.stats()["breaker"] == "open"


@pytest.mark.parametrize("egress", [False, True])
async def test_tool_network_only_with_egress_and_never_to_the_platform(
    make_host: HostFactory, emulator: EmulatorServer, egress: bool
) -> None:
    import socket

    host = make_host(egress=egress)
    sid = (await host.open_session("alice"))["id"]
    port = emulator.base_url.rsplit(":", 1)[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_socket:
        probe_socket.connect(("192.0.2.254", 9))  # no packet: picks the node's own address
        node_ip = probe_socket.getsockname()[0]
    # A platform-like service on the node's own address (as Ray's GCS is).
    server = await asyncio.start_server(lambda r, w: w.close(), node_ip, 0)
    node_port = server.sockets[0].getsockname()[1]
    probe = (
        "grep -c : /proc/net/dev; "  # interfaces this namespace has (lo alone: 1)
        f"(exec 3<>/dev/tcp/127.0.0.1/{port}) && echo REACHED-LOOPBACK; "
        f"(exec 3<>/dev/tcp/{node_ip}/{node_port}) && echo REACHED-NODE; true"
    )
    try:
        turn = await host.send(sid, "[[tool bash " + json.dumps({"command": probe}) + "]]")
    finally:
        server.close()
    text = _text(turn)
    interfaces = int(text.split('"')[1].split()[0])
    assert (interfaces > 1) is egress  # egress: the node's network; else only loopback
    assert "REACHED" not in text  # the emulator's port is the platform's: closed either way


async def test_turn_time_limit_kills_the_tool_process(make_host: HostFactory) -> None:
    host = make_host(turn_timeout_s=2, tool_timeout_s=60)
    sid = (await host.open_session("alice"))["id"]
    with pytest.raises(UpstreamError, match="past its 2 s limit"):
        await host.send(sid, '[[tool bash {"command": "sleep 31.5"}]]')

    await wait_until_async(
        lambda: not processes_with(b"sleep\x0031.5"), "the tool's process to be gone", 5
    )
    assert (await host.send(sid, "still usable"))["index"] == 1
