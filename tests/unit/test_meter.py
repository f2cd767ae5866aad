"""Usage metering: the replica's batching ``UsageMeter`` and the control store's
``record_usages``, which counts each turn once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from actors.meter import UsageMeter
from hyperfleet.metering import Reservation, UsageRecord
from serve_app.control import ControlStore

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
    assert [[r.turn_id for r in b] for b in receiver.batches] == [["turn-0", "turn-1", "turn-2"]]
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
    assert [[r.turn_id for r in b] for b in receiver.batches] == [
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
    sent = [r.turn_id for b in receiver.batches for r in b]
    assert sent == ["turn-0", "turn-1", "turn-2"]
    assert meter.dropped == 0


async def test_a_refused_batch_is_dropped_not_retried_forever() -> None:
    receiver = Receiver(ValueError("bad record"))
    meter = _meter(receiver)
    meter.add(_record(0))
    assert await meter.flush(5.0)
    meter.add(_record(1))
    assert await meter.flush(5.0)
    assert [r.turn_id for b in receiver.batches for r in b] == ["turn-1"]
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
    assert [[r.turn_id for r in b] for b in receiver.batches] == [
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
