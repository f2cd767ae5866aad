"""Every model call is metered once, whatever becomes of its turn, and the daily budget is checked
before every further call: ``SessionHost`` + ``AgentLoop`` against the emulator over HTTP, on the
SQLite session store and its usage outbox, metered by the replica's ``OutboxMetering`` into the
real ``ControlStore`` (``Ledger`` is ``RayControlLink`` minus Ray: the store's methods, called in
this process, and a log of what reached them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from actors import AgentSpec, RuntimeConfig, SessionHost, SqliteSessionStore, UpstreamError
from actors.actor import build_host
from actors.meter import OutboxMetering
from actors.store import TurnRecord
from hyperfleet.errors import BudgetExceededError, StoreError
from hyperfleet.metering import Charge, Reservation, UsageRecord
from serve_app.control import ControlStore

from .conftest import EmulatorServer
from .waiting import wait_until_async

USER = "usr_metered"
MAX_TOKENS = 64


class Ledger:
    """A ``ControlLink`` onto the real control store: every record and charge that reached it."""

    def __init__(self, control: ControlStore) -> None:
        self.control = control
        self.records: list[UsageRecord] = []
        self.charges: list[UsageRecord] = []
        self.meterings: list[OutboxMetering] = []

    async def record_usages(self, batch: list[UsageRecord]) -> bool:
        self.records.extend(batch)
        self.control.record_usages(batch)
        return True

    async def settled(self) -> None:
        """Every record the hosts handed over has reached the control store."""
        for metering in self.meterings:
            assert await metering.flush(5.0)

    async def charge(
        self, record: UsageRecord, reservation: Reservation, next_tokens: int
    ) -> Charge:
        self.charges.append(record)
        return self.control.charge(record, reservation, next_tokens)

    def used(self) -> int:
        rows = self.control.usage(USER)
        return sum(
            r.input_tokens
            + r.output_tokens
            + r.cache_read_input_tokens
            + r.cache_creation_input_tokens
            for r in rows
        )

    def turns(self) -> int:
        return sum(r.turns for r in self.control.usage(USER))


class LostReplyStore(SqliteSessionStore):
    """A store whose commits happen but whose replies are lost (a timeout after the write)."""

    async def commit_turn(
        self, turn: TurnRecord, expected_version: int, usage: UsageRecord | None = None
    ) -> None:
        await super().commit_turn(turn, expected_version, usage)
        raise StoreError("session store did not answer commit_turn in 10.0 s")


@pytest.fixture
async def metered(
    emulator: EmulatorServer, tmp_path: Path, workspaces_root: Path
) -> AsyncIterator[Callable[..., tuple[SessionHost, Ledger, SqliteSessionStore]]]:
    control = ControlStore(tmp_path / "control.db")
    ledger = Ledger(control)
    clients: list[anthropic.AsyncAnthropic] = []
    stores: list[SqliteSessionStore] = []

    def make(
        budget: int | None = 100_000,
        store_class: type[SqliteSessionStore] = SqliteSessionStore,
        headers: dict[str, str] | None = None,
        **spec_fields: Any,
    ) -> tuple[SessionHost, Ledger, SqliteSessionStore]:
        if control.get_user(USER) is None:
            control.create_user(USER, "metered", {"tokens_per_day": budget})
        store = store_class(tmp_path / "sessions.db")
        stores.append(store)
        client = anthropic.AsyncAnthropic(
            base_url=emulator.base_url,
            api_key=emulator.api_key,
            max_retries=0,
            default_headers=headers or {},
        )
        clients.append(client)
        spec = AgentSpec(
            **{"tools": ("bash", "read_file"), "max_tokens": MAX_TOKENS, **spec_fields}
        )
        runtime = RuntimeConfig(workspaces=str(workspaces_root))
        metering = OutboxMetering("agt_m-0", store, 60.0, ledger)
        ledger.meterings.append(metering)
        host = build_host(
            "agt_m", spec, runtime, client, store=store, metering=metering, stream_backoff_s=0.01
        )
        return host, ledger, store

    yield make
    for client in clients:
        await client.close()
    for store in stores:
        store.close()
    control.close()


def _reserve(ledger: Ledger, tokens: int = MAX_TOKENS) -> Reservation:
    user = ledger.control.get_user(USER)
    assert user is not None and user.tokens_per_day is not None
    return ledger.control.reserve(USER, tokens, user.tokens_per_day)


def _nothing_held(ledger: Ledger) -> bool:
    """No reservation of the user's is left: the rest of the day's budget can be reserved."""
    user = ledger.control.get_user(USER)
    assert user is not None and user.tokens_per_day is not None
    rest = user.tokens_per_day - ledger.used()
    ledger.control.release(ledger.control.reserve(USER, rest, user.tokens_per_day))
    return True


async def test_a_turn_that_times_out_after_answering_is_metered(
    metered: Callable[..., tuple[SessionHost, Ledger, SqliteSessionStore]],
) -> None:
    """The audit's case: the model answered (with a tool call), the tool outlived the turn's
    limit, the turn raised before its commit. Its model call is billed all the same."""
    host, ledger, _ = metered(turn_timeout_s=2, tool_timeout_s=60)
    sid = (await host.open_session(USER))["id"]
    with pytest.raises(UpstreamError, match="past its 2 s limit"):
        await host.send(sid, '[[tool bash {"command": "sleep 30"}]]', reservation=_reserve(ledger))
    await ledger.settled()
    assert ledger.used() > 0 and ledger.turns() == 1
    assert _nothing_held(ledger)  # the turn's reservation ended with its usage


async def test_a_stream_that_breaks_after_output_began_is_metered(
    metered: Callable[..., tuple[SessionHost, Ledger, SqliteSessionStore]],
) -> None:
    host, ledger, _ = metered(
        headers={"x-emulator-fault": "midstream", "x-emulator-fault-after": "6"}
    )
    sid = (await host.open_session(USER))["id"]
    with pytest.raises(UpstreamError, match="broke after output began"):
        await host.send(sid, "a long enough answer, please", reservation=_reserve(ledger))
    await ledger.settled()
    (record,) = ledger.records
    assert record.usage["input_tokens"] > 0  # what message_start reported
    assert ledger.turns() == 1 and _nothing_held(ledger)


async def test_each_further_model_call_is_checked_against_the_budget(
    metered: Callable[..., tuple[SessionHost, Ledger, SqliteSessionStore]],
) -> None:
    """A tool loop that would make ``max_turns`` calls stops when the day's budget cannot cover
    the next one; the day's usage exceeds the budget by at most one call."""
    host, ledger, _ = metered(budget=3_000, max_turns=30)
    sid = (await host.open_session(USER))["id"]
    # A file whose contents tell the model to read it again: each read is another call.
    directive = '[[tool read_file {"path": "loop.txt"}]]'
    command = f"printf '%s' '{directive}' > loop.txt"
    await host.send(sid, "[[tool bash " + json.dumps({"command": command}) + "]]")
    await ledger.settled()
    before = ledger.used()
    with pytest.raises(BudgetExceededError, match="ran out during the turn"):
        await host.send(
            sid, '[[tool read_file {"path": "loop.txt"}]]', reservation=_reserve(ledger)
        )
    await ledger.settled()
    calls = [r.tokens for r in ledger.charges] + [ledger.records[-1].tokens]
    assert 1 < len(ledger.charges) < 30
    assert ledger.used() - before == sum(calls)  # every call of the refused turn, once
    assert ledger.used() <= 3_000 + max(calls)
    assert _nothing_held(ledger)


async def test_a_commit_whose_reply_was_lost_is_metered_once(
    metered: Callable[..., tuple[SessionHost, Ledger, SqliteSessionStore]],
) -> None:
    host, ledger, store = metered(store_class=LostReplyStore)
    sid = (await host.open_session(USER))["id"]
    # The host looks the turn up after the lost reply, finds it, and answers with it.
    turn = await host.send(sid, "hello", "key-1", reservation=_reserve(ledger))
    assert turn["index"] == 1 and turn["replayed"] is False
    # The commit carried the turn's record into the outbox, and the host metered the same
    # record (one outbox row): it counts once, and leaves the outbox once metered.
    await ledger.settled()
    (record,) = ledger.records
    assert record.id.endswith(":end") and record.turns == 1
    assert await store.unmetered_usage(float("inf"), 10) == []
    assert ledger.control.record_usages([record]) == 0  # a sweep's resend: counted already
    assert ledger.turns() == 1
    used = ledger.used()
    healthy, _, _ = metered()
    replayed = await healthy.send(sid, "hello", "key-1", reservation=_reserve(ledger))
    assert replayed["replayed"] is True
    await ledger.settled()
    assert ledger.used() == used and ledger.turns() == 1  # a replay meters nothing again
    assert _nothing_held(ledger)  # and its reservation ended


async def test_a_calls_usage_is_metered_before_its_tools_run(
    metered: Callable[..., tuple[SessionHost, Ledger, SqliteSessionStore]],
) -> None:
    """A replica that dies while a tool runs (for minutes, say) has already metered the call
    that asked for the tool: its usage is not only in the dying process's memory."""
    host, ledger, store = metered(turn_timeout_s=5, tool_timeout_s=60)
    sid = (await host.open_session(USER))["id"]
    turn = asyncio.ensure_future(host.send(sid, '[[tool bash {"command": "sleep 30"}]]'))
    try:
        await wait_until_async(lambda: bool(ledger.records), "the first call's record", 5)
        assert not turn.done() and host.stats()["busy_sessions"] == 1  # the tool still runs
        (record,) = ledger.records
        assert record.id.endswith(":1") and record.tokens > 0 and record.turns == 0
        assert ledger.used() == record.tokens
        # It was in the session store's outbox before it was sent, and left it once metered.
        assert await store.unmetered_usage(float("inf"), 10) == []
    finally:
        turn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await turn
    # The cancelled turn meters nothing twice: its final record carries no further call.
    await ledger.settled()
    assert ledger.records[-1].id.endswith(":end") and ledger.records[-1].tokens == 0
    assert ledger.used() == record.tokens and ledger.turns() == 1


async def test_a_retried_stream_attempt_is_checked_against_the_budget(
    metered: Callable[..., tuple[SessionHost, Ledger, SqliteSessionStore]],
) -> None:
    """Each attempt of a call whose stream breaks after ``message_start`` is billed its input:
    the retry is metered and checked first, like a further call."""
    host, ledger, _ = metered(headers={"x-emulator-fault": "drop", "x-emulator-fault-after": "1"})
    sid = (await host.open_session(USER))["id"]
    with pytest.raises(UpstreamError, match="failed 3 times"):
        await host.send(sid, "hello", reservation=_reserve(ledger))
    await ledger.settled()
    assert [r.id.rsplit(":", 1)[1] for r in ledger.charges] == ["1", "2"]
    per_attempt = ledger.charges[0].tokens
    assert per_attempt > 0 and ledger.used() == 3 * per_attempt
    assert _nothing_held(ledger)
