"""Usage metering from a replica: each turn's model calls, charged as they happen and sent to the
control store in batches (``hyperfleet.metering`` says how a turn's tokens travel).

``TurnMeter`` follows one turn: the loop tells it each model call's usage and asks it before
every further call, when it charges the calls so far and re-takes the user's reservation for the
next one (the day's budget may refuse it); its ``final`` record meters the rest, whether the turn
commits, fails, times out or is cancelled.

``UsageMeter`` sends records to the control store in batches:

One control-store call per turn cost the head's control actor about 3 ms of CPU per turn (a Ray
call and a SQLite commit each), a fifth of a turn's whole cost under load. The meter sends, in one
call, every turn that committed in the ``METER_LINGER_S`` after the first one and while its
previous call was on its way. The linger also keeps the call off the turn's critical path: sent
at once, it ran on the replica's event loop before the turn's reply left (the reply's hop back
to the ingress took 2.09 ms with it, 1.20 ms without), and a usage row shows up to 50 ms
later, which no reader can tell.

Each record carries its id and the control store ignores ids it has metered, so a batch whose
reply was lost is sent again without counting twice. Every record is in the session store's usage
outbox before it is sent (a committed turn's in its commit) and leaves it once the control store
took it, so a replica that dies with records in memory loses none: another replica's sweep sends
them (``AgentActor``). While the control store is unreachable the meter retries with backoff and
holds at most ``METER_MAX_PENDING`` records in memory (then drops the oldest, which the outbox
still has).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from hyperfleet.errors import BudgetExceededError, HyperfleetError, StoreError
from hyperfleet.metering import Charge, Reservation, UsageRecord

from .pricing import Usage
from .store import SessionStore

logger = logging.getLogger(__name__)

OUTBOX_SWEEP_MAX = 500  # records a sweep takes at a time
METER_LINGER_S = 0.05
METER_MAX_BATCH = 500
METER_MAX_PENDING = 100_000
METER_BACKOFF_S = 0.1
METER_BACKOFF_MAX_S = 5.0
FLUSH_POLL_S = 0.01


class Metering(Protocol):
    """Where a host's usage goes (``AgentActor`` over the control store; tests give their own)."""

    async def record(self, record: UsageRecord, in_outbox: bool) -> None:
        """Meters ``record`` soon; ``in_outbox``: the session store holds it already (committed
        with its turn), else it is written there first (awaited), so a replica's death does not
        lose it."""

    async def charge(
        self, record: UsageRecord, reservation: Reservation, next_tokens: int
    ) -> Charge:
        """Meters ``record`` and re-takes ``reservation`` as ``next_tokens`` in one step, or
        says why the day's budget refused (and ended) it. Raises ``HyperfleetError`` when the
        control store cannot answer (the record may or may not have counted)."""
        ...


class TurnMeter:
    """One turn's model calls and its reservation, metered exactly once between its charges
    (named ``<turn id>:<calls so far>``) and its final record (``<turn id>:end``): a record made
    twice is the same record, and counts once."""

    def __init__(
        self,
        turn_id: str,
        owner: str,
        agent_id: str,
        model: str,
        reservation: Reservation | None,
        metering: Metering | None,
    ) -> None:
        self.turn_id = turn_id
        self.owner = owner
        self.agent_id = agent_id
        self.model = model
        self.reservation = reservation
        self._metering = metering
        self.calls: list[Usage] = []
        self._metered = 0  # calls already charged
        self.started = False  # a model call was asked for
        self._final: UsageRecord | None = None
        self._finalized = False
        self._unsettled: UsageRecord | None = None

    def add(self, usage: Usage) -> None:
        """One model call's usage (of a call that broke, what its stream reported)."""
        self.calls.append(usage)

    def start(self) -> None:
        """The turn is about to make its first model call, which the reservation admission
        took covers."""
        self.started = True

    async def checkpoint(self, max_tokens: int, next_call: bool = True) -> None:
        """Meters the calls not metered yet, so that a replica that dies later (during the
        turn's tools, which may run for long) loses none of them. Called after a model call
        that the turn follows with tools (``next_call``: and another call), and before a stream
        attempt retried after one that reported usage (its input is sent again).

        With a reservation, the calls are charged and the reservation re-taken for the next
        call's estimate: the last call's input and output (the next input holds both) plus
        ``max_tokens``. Raises ``BudgetExceededError`` when the budget cannot cover a next call.
        Without one, they are recorded (the outbox, then the control store)."""
        if self._metering is None or self._metered == len(self.calls):
            return
        record = self._span(f"{self.turn_id}:{len(self.calls)}", turns=0, reservation=None)
        self._metered = len(self.calls)  # those calls are the record's, whether it lands or not
        if self.reservation is None:
            await self._metering.record(record, in_outbox=False)
            return
        last = self.calls[-1]
        estimate = (
            last.input_tokens
            + last.cache_read_input_tokens
            + last.cache_creation_input_tokens
            + last.output_tokens
            + max_tokens
        )
        self._unsettled = record
        charge = await self._metering.charge(record, self.reservation, estimate)
        self._unsettled = None
        self.reservation = charge.reservation
        if charge.refusal is not None and next_call:
            raise BudgetExceededError(
                f"the day's token budget ran out during the turn: {charge.refusal}"
            )

    @property
    def finalized(self) -> bool:
        return self._finalized

    def final(self) -> UsageRecord | None:
        """The record that ends the turn's metering: the calls not charged yet and the
        reservation to end; None when there is nothing to meter or end. The same record every
        time it is asked (a commit carries it, and a commit that failed meters it again)."""
        if not self._finalized:
            self._finalized = True
            if not self.started and self.reservation is None:
                self._final = None
            elif not self.started:  # no model call: the record only ends the reservation
                user = self.reservation.user_id if self.reservation else self.owner
                self._final = UsageRecord(
                    f"{self.turn_id}:end", user, self.agent_id, {}, 0.0, self.reservation, turns=0
                )
            else:
                self._final = self._span(f"{self.turn_id}:end", 1, self.reservation)
        return self._final

    def unsettled(self) -> list[UsageRecord]:
        """With ``final``, what a turn that failed meters: a charge that raised (the control
        store did not answer: it may or may not have counted) is sent again, under its id."""
        return [] if self._unsettled is None else [self._unsettled]

    def _span(self, id: str, turns: int, reservation: Reservation | None) -> UsageRecord:
        usage = sum(self.calls[self._metered :], Usage())
        return UsageRecord(
            id,
            self.owner,
            self.agent_id,
            usage.to_json(),
            usage.cost_usd(self.model),
            reservation,
            turns,
        )


class UsageMeter:
    """Batches usage records to ``send``. A batch whose ``send`` raises an error that
    ``retryable`` accepts (the batch may not have arrived) is sent again; any other error drops
    it, logged: the control store refused it, and would again."""

    def __init__(
        self,
        send: Callable[[list[UsageRecord]], Awaitable[None]],
        name: str,
        retryable: Callable[[Exception], bool],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_batch: int = METER_MAX_BATCH,
        max_pending: int = METER_MAX_PENDING,
        linger_s: float = METER_LINGER_S,
    ) -> None:
        self._send = send
        self._name = name
        self._retryable = retryable
        self._sleep = sleep
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._linger_s = linger_s
        self._pending: collections.deque[UsageRecord] = collections.deque()
        self._queued: set[str] = set()  # ids pending or in flight
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, record: UsageRecord) -> None:
        """Queues a usage record; called on the event loop. A record with the id of one queued
        or on its way is not queued twice (a sweep finds what the meter is retrying)."""
        if record.id in self._queued:
            return
        self._queued.add(record.id)
        if len(self._pending) >= self._max_pending:
            lost = self._pending.popleft()
            self._queued.discard(lost.id)
            self.dropped += 1
            logger.error("%s: usage queue full; %s is not metered", self._name, lost.id)
        self._pending.append(record)
        if self._task is None or self._task.done():
            # A context of its own: the batches it sends are no one turn's (hyperfleet.logs).
            self._task = asyncio.get_running_loop().create_task(
                self._run(), context=contextvars.Context()
            )

    async def _run(self) -> None:
        failures = 0
        if self._linger_s > 0:
            await self._sleep(self._linger_s)
        while self._pending:
            batch = [self._pending.popleft() for _ in range(min(self._max_batch, self.pending))]
            try:
                await self._send(batch)
            except Exception as e:  # noqa: BLE001 - a supervisory loop: classified, logged
                if not self._retryable(e):
                    self._queued.difference_update(r.id for r in batch)
                    self.dropped += len(batch)
                    logger.error(
                        "%s: the control store refused %d turns' usage: %r",
                        self._name,
                        len(batch),
                        e,
                    )
                    continue
                self._pending.extendleft(reversed(batch))
                failures += 1
                delay_s = min(METER_BACKOFF_MAX_S, METER_BACKOFF_S * 2 ** (failures - 1))
                logger.warning(
                    "%s: metering %d turns failed (%s); retrying in %.1f s",
                    self._name,
                    len(batch),
                    e,
                    delay_s,
                )
                await self._sleep(delay_s)
                continue
            failures = 0
            self._queued.difference_update(r.id for r in batch)
            self.sent += len(batch)

    async def flush(self, timeout_s: float) -> bool:
        """Waits until every queued record is sent; False if some are left after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._pending or (self._task is not None and not self._task.done()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(FLUSH_POLL_S)
        return True


class ControlUnavailable(Exception):
    """The control store did not answer (restarting, slow, its Redis down): a record sent may or
    may not have arrived, and is sent again."""


class UsageRefused(Exception):
    """The control store refused the records (and would again)."""


class ControlLink(Protocol):
    """The control store as a replica's metering calls it (``actor.RayControlLink`` over Ray;
    tests call a ``ControlStore`` in-process). Both raise ``ControlUnavailable`` or
    ``UsageRefused``."""

    async def record_usages(self, batch: list[UsageRecord]) -> bool:
        """Meters a batch; False when there is no control store to meter to (a batch job's
        cluster without the HTTP API)."""
        ...

    async def charge(
        self, record: UsageRecord, reservation: Reservation, next_tokens: int
    ) -> Charge: ...


class OutboxMetering:
    """``Metering`` for a replica. A record is in the session store's outbox first (a committed
    turn's in its commit; another's written here, awaited), then goes to the control store in
    batches (``UsageMeter``), and leaves the outbox once the control store took it (or refused
    it: it would again). ``sweep`` sends records that stayed in the outbox past ``grace_s``
    (their replica died, or their ack was lost; a live replica acks within seconds, or retries
    while the control store is down): any replica's sweep does, and they count once. A charge
    is one control-store call."""

    def __init__(
        self, name: str, store: SessionStore, grace_s: float, control: ControlLink
    ) -> None:
        self._name = name
        self._store = store
        self._grace_s = grace_s
        self._control = control
        self._meter = UsageMeter(self._send, name, lambda e: isinstance(e, ControlUnavailable))

    async def record(self, record: UsageRecord, in_outbox: bool) -> None:
        if in_outbox or not (record.tokens or record.turns):
            # A release alone is not written: lost, it only holds budget until it expires.
            self._meter.add(record)
            return
        # In the outbox before the meter can send (and ack) it. Shielded: a turn cancelled
        # while it meters still writes its record.
        write = asyncio.ensure_future(self._write(record))
        try:
            await asyncio.shield(write)
        finally:
            self._meter.add(record)

    async def _write(self, record: UsageRecord) -> None:
        try:
            await self._store.record_usage(record)
        except HyperfleetError as e:
            logger.warning("%s: %s is in memory only: %s", self._name, record.id, e)

    async def charge(
        self, record: UsageRecord, reservation: Reservation, next_tokens: int
    ) -> Charge:
        try:
            return await self._control.charge(record, reservation, next_tokens)
        except (ControlUnavailable, UsageRefused) as e:
            raise StoreError(f"the day's token budget could not be checked: {e}") from e

    async def _send(self, batch: list[UsageRecord]) -> None:
        try:
            if not await self._control.record_usages(batch):
                logger.warning(
                    "%s: no control store; %d records not metered", self._name, len(batch)
                )
        except UsageRefused:
            await self._ack(batch)  # refused (the meter logs it): it would be, every sweep
            raise
        await self._ack(batch)

    async def _ack(self, batch: list[UsageRecord]) -> None:
        try:
            await self._store.ack_usage([r.id for r in batch])
        except HyperfleetError as e:  # the sweep sends them again; they count once
            logger.warning("%s: the outbox keeps %d metered records: %s", self._name, len(batch), e)

    async def sweep(self) -> int:
        """Meters what the outbox held past the grace period (records the meter holds already
        are not added twice); returns how many records it found."""
        records = await self._store.unmetered_usage(time.time() - self._grace_s, OUTBOX_SWEEP_MAX)
        for record in records:
            self._meter.add(record)
        return len(records)

    async def flush(self, timeout_s: float) -> bool:
        return await self._meter.flush(timeout_s)
