"""Usage metering: a turn's ``TurnMeter`` (a charge before each further model call, one final
record), the replica's batching ``UsageMeter``, and the control store's ``record_usages`` and
``charge``, which count each record once."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from actors.meter import (
    ControlUnavailable,
    OutboxMetering,
    TurnMeter,
    UsageMeter,
    UsageRefused,
)
from actors.pricing import Usage
from actors.store import SqliteSessionStore
from actors.store.base import readable_usage
from hyperfleet.errors import BudgetExceededError
from hyperfleet.metering import Charge, Reservation, UsageRecord, usage_to_json
from serve_app.control import ControlStore
from serve_app.errors import QuotaExceededError

USAGE = {"input_tokens": 10, "output_tokens": 5}


def _record(n: int, reservation: Reservation | None = None) -> UsageRecord:
    return UsageRecord(f"turn-{n}", "usr_a", "agt_1", USAGE, 0.5, reservation)


class Flaky(Exception):
    pass


class Receiver:
    """Stands in for the control store's side of the call; ``fail`` errors are raised first."""

    def __init__(self, *fail: Exception) -> None:
        self.fail = list(fail)
        self.batches: list[list[UsageRecord]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, batch: list[UsageRecord]) -> None:
        await self.gate.wait()
        if self.fail:
            raise self.fail.pop(0)
        self.batches.append(batch)


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def _meter(receiver: Receiver, **kwargs: Any) -> UsageMeter:
    kwargs.setdefault("linger_s", 0.0)
    return UsageMeter(
        receiver.send, "r0", lambda e: isinstance(e, Flaky), sleep=_no_sleep, **kwargs
    )


async def test_turns_committed_within_the_linger_go_in_one_call_after_it() -> None:
    receiver = Receiver()
    lingered: list[float] = []
    wake = asyncio.Event()

    async def linger(delay_s: float) -> None:
        lingered.append(delay_s)
        await wake.wait()

    meter = UsageMeter(receiver.send, "r0", lambda e: False, sleep=linger, linger_s=0.05)
    meter.add(_record(0))
    await asyncio.sleep(0)
    meter.add(_record(1))
    meter.add(_record(2))
    await asyncio.sleep(0)
    # Nothing is sent while the first turn's reply may still be leaving the replica.
    assert receiver.batches == [] and meter.pending == 3
    wake.set()
    assert await meter.flush(5.0)
    assert [[r.id for r in b] for b in receiver.batches] == [["turn-0", "turn-1", "turn-2"]]
    assert lingered == [0.05]


async def test_turns_committed_during_a_call_go_together_in_the_next() -> None:
    receiver = Receiver()
    meter = _meter(receiver)
    receiver.gate.clear()  # the first call is in flight...
    meter.add(_record(0))
    await asyncio.sleep(0)
    for n in range(1, 6):  # ...while five more turns commit
        meter.add(_record(n))
    receiver.gate.set()
    assert await meter.flush(5.0)
    assert [[r.id for r in b] for b in receiver.batches] == [
        ["turn-0"],
        [f"turn-{n}" for n in range(1, 6)],
    ]
    assert meter.sent == 6 and meter.pending == 0


async def test_a_batch_that_may_not_have_arrived_is_resent_in_order() -> None:
    receiver = Receiver(Flaky("restarting"), Flaky("restarting"))
    meter = _meter(receiver)
    for n in range(3):
        meter.add(_record(n))
    assert await meter.flush(5.0)
    sent = [r.id for b in receiver.batches for r in b]
    assert sent == ["turn-0", "turn-1", "turn-2"]
    assert meter.dropped == 0


async def test_a_refused_batch_is_dropped_not_retried_forever() -> None:
    receiver = Receiver(ValueError("bad record"))
    meter = _meter(receiver)
    meter.add(_record(0))
    assert await meter.flush(5.0)
    meter.add(_record(1))
    assert await meter.flush(5.0)
    assert [r.id for b in receiver.batches for r in b] == ["turn-1"]
    assert meter.dropped == 1


async def test_pending_records_are_bounded_and_batches_capped() -> None:
    receiver = Receiver()
    meter = _meter(receiver, max_pending=4, max_batch=2)
    receiver.gate.clear()
    meter.add(_record(0))
    await asyncio.sleep(0)  # turn-0 is in flight; four more fit, a fifth pushes out the oldest
    for n in range(1, 6):
        meter.add(_record(n))
    assert meter.dropped == 1 and meter.pending == 4
    assert not await meter.flush(0.05)  # still blocked
    receiver.gate.set()
    assert await meter.flush(5.0)
    assert [[r.id for r in b] for b in receiver.batches] == [
        ["turn-0"],
        ["turn-2", "turn-3"],
        ["turn-4", "turn-5"],
    ]


def test_record_usages_counts_each_turn_once_and_ends_reservations(tmp_path: Path) -> None:
    mirrored: list[tuple[str, int, list[Reservation]]] = []
    store = ControlStore(
        tmp_path / "control.db", lambda user, day, used, res: mirrored.append((user, used, res))
    )
    try:
        store.create_user("usr_a", "a", {"tokens_per_day": 1_000})
        held = store.reserve("usr_a", 200, 1_000)
        batch = [_record(0, held), _record(1)]
        assert store.record_usages(batch) == 2
        assert store.record_usages(batch) == 0  # a resent batch (its reply was lost)
        assert store.record_usages([_record(1), _record(2)]) == 1
        (row,) = store.usage("usr_a")
        assert row.turns == 3 and row.input_tokens == 30 and row.output_tokens == 15
        assert row.cost_usd == pytest.approx(1.5)
        # The 200-token reservation ended with its turn, or 45 used + 200 + 955 would not fit.
        store.reserve("usr_a", 955, 1_000)
        assert [(u, used) for u, used, _ in mirrored] == [("usr_a", 30), ("usr_a", 45)]
        assert mirrored[0][2] == [held]  # the metered turns' reservations, to end in Redis
    finally:
        store.close()


class Ledger:
    """``Metering`` straight onto a real ``ControlStore`` (what ``ReplicaMetering`` does over
    Ray): the records a host hands over, metered as they come."""

    def __init__(self, store: ControlStore) -> None:
        self.store = store
        self.records: list[tuple[UsageRecord, bool]] = []

    async def record(self, record: UsageRecord, in_outbox: bool) -> None:
        self.records.append((record, in_outbox))
        self.store.record_usages([record])

    async def charge(
        self, record: UsageRecord, reservation: Reservation, next_tokens: int
    ) -> Charge:
        return self.store.charge(record, reservation, next_tokens)


CALL = Usage(input_tokens=100, output_tokens=20, cache_read_input_tokens=30)


async def test_turn_meter_charges_each_further_call_and_ends_with_the_rest(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.db")
    try:
        store.create_user("usr_a", "a", {"tokens_per_day": 1_000})
        held = store.reserve("usr_a", 64, 1_000)
        ledger = Ledger(store)
        meter = TurnMeter("turn_1", "usr_a", "agt_1", "claude-haiku-4-5", held, ledger)
        meter.start()  # the first call: admission's reservation covers it
        meter.add(CALL)
        await meter.checkpoint(64)  # charges call 1, re-takes 150 + 64 for call 2
        await meter.checkpoint(64)  # nothing new since: no charge
        assert meter.reservation == replace(held, tokens=214)
        (row,) = store.usage("usr_a")
        assert (row.input_tokens, row.turns) == (100, 0)
        # 150 used + 214 held: another turn may reserve 636 of the day, not 637.
        with pytest.raises(QuotaExceededError):
            store.reserve("usr_a", 637, 1_000)
        meter.add(CALL)
        final = meter.final()
        assert final is not None and final is meter.final()  # the same record when asked again
        assert final.id == "turn_1:end" and final.turns == 1 and final.tokens == 150
        assert final.reservation == meter.reservation
        assert store.record_usages([final, final]) == 1
        (row,) = store.usage("usr_a")
        assert (row.input_tokens, row.output_tokens, row.turns) == (200, 40, 1)
        store.reserve("usr_a", 700, 1_000)  # 300 used and nothing held: 700 fits
    finally:
        store.close()


async def test_turn_meter_refuses_a_call_the_budget_cannot_cover(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.db")
    try:
        store.create_user("usr_a", "a", {"tokens_per_day": 300})
        held = store.reserve("usr_a", 64, 300)
        meter = TurnMeter("turn_1", "usr_a", "agt_1", "claude-haiku-4-5", held, Ledger(store))
        meter.start()
        meter.add(CALL)
        # 150 used + 150 + 64 for the next call > 300: refused, and the reservation ended.
        with pytest.raises(BudgetExceededError, match="ran out during the turn"):
            await meter.checkpoint(64)
        assert meter.reservation is None
        final = meter.final()
        assert final is not None and final.tokens == 0 and final.turns == 1
        store.record_usages([final])
        (row,) = store.usage("usr_a")
        assert (row.input_tokens + row.output_tokens + row.cache_read_input_tokens) == 150
        assert row.turns == 1
        store.reserve("usr_a", 150, 300)  # nothing is held any more
    finally:
        store.close()


async def test_a_turn_without_a_model_call_only_ends_its_reservation(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.db")
    try:
        store.create_user("usr_a", "a", {"tokens_per_day": 100})
        held = store.reserve("usr_a", 100, 100)
        meter = TurnMeter("turn_1", "usr_a", "agt_1", "claude-haiku-4-5", held, Ledger(store))
        final = meter.final()  # a replay, a busy session: no model call
        assert final is not None and final.tokens == 0 and final.turns == 0
        assert final.reservation == held
        store.record_usages([final])
        assert store.usage("usr_a") == []  # no usage row, no turn
        store.reserve("usr_a", 100, 100)
        unbudgeted = TurnMeter("turn_2", "usr_a", "agt_1", "claude-haiku-4-5", None, None)
        assert unbudgeted.final() is None
    finally:
        store.close()


def test_charge_with_a_budget_removed_since_admission_still_moves_the_hold(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "control.db")
    try:
        store.create_user("usr_a", "a", {"tokens_per_day": 100})
        held = store.reserve("usr_a", 50, 100)
        store.set_quotas("usr_a", {})
        record = UsageRecord("turn_1:1", "usr_a", "agt_1", {"input_tokens": 500}, 0.1, None, 0)
        charge = store.charge(record, held, 80)
        assert charge.refusal is None and charge.reservation == replace(held, tokens=80)
        assert store.charge(record, held, 80).refusal is None  # a resent charge counts once
        (row,) = store.usage("usr_a")
        assert row.input_tokens == 500
    finally:
        store.close()


class FlakyLink:
    """A ``ControlLink`` that is down until ``up`` is set, then meters into ``store``."""

    def __init__(self, store: ControlStore, refuse: bool = False) -> None:
        self.store = store
        self.up = False
        self.refuse = refuse
        self.batches: list[list[UsageRecord]] = []

    async def record_usages(self, batch: list[UsageRecord]) -> bool:
        if not self.up:
            raise ControlUnavailable("restarting")
        if self.refuse:
            raise UsageRefused("no such user")
        self.batches.append(batch)
        self.store.record_usages(batch)
        return True

    async def charge(
        self, record: UsageRecord, reservation: Reservation, next_tokens: int
    ) -> Charge:
        raise AssertionError("not charged here")


async def test_outbox_metering_keeps_records_until_the_control_store_takes_them(
    tmp_path: Path,
) -> None:
    control = ControlStore(tmp_path / "control.db")
    sessions = SqliteSessionStore(tmp_path / "sessions.db")
    try:
        control.create_user("usr_a", "a", {})
        link = FlakyLink(control)
        metering = OutboxMetering("agt_1-0", sessions, 0.0, link)
        await metering.record(_record(1), in_outbox=False)
        # Written before it was sent; the control store is down, so it stays there.
        assert [r.id for r in await sessions.unmetered_usage(float("inf"), 10)] == ["turn-1"]
        assert not await metering.flush(0.3)
        assert await metering.sweep() == 1  # a sweep finds what the meter retries: not twice
        link.up = True
        assert await metering.flush(10.0)
        assert [[r.id for r in b] for b in link.batches] == [["turn-1"]]
        assert await sessions.unmetered_usage(float("inf"), 10) == []  # acked
        assert await metering.sweep() == 0
        (row,) = control.usage("usr_a")
        assert row.input_tokens == 10 and row.turns == 1
    finally:
        sessions.close()
        control.close()


async def test_a_refused_record_leaves_the_outbox(tmp_path: Path) -> None:
    control = ControlStore(tmp_path / "control.db")
    sessions = SqliteSessionStore(tmp_path / "sessions.db")
    try:
        link = FlakyLink(control, refuse=True)
        link.up = True
        metering = OutboxMetering("agt_1-0", sessions, 0.0, link)
        await metering.record(_record(1), in_outbox=False)
        assert await metering.flush(5.0)
        assert await sessions.unmetered_usage(float("inf"), 10) == []  # not resent forever
    finally:
        sessions.close()
        control.close()


def test_an_unreadable_outbox_row_is_skipped() -> None:
    good = _record(1)
    assert readable_usage([b"{not json", usage_to_json(good), '{"id": "x"}']) == [good]
