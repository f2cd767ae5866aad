"""Running a turn: the half of ``SessionHost`` that takes a message to a committed turn.

A message is admitted at its session's gate (``actors.session.TurnGate``): with ``if_busy`` it is
refused while a turn runs (``reject``, today's 409), waits its turn in order behind at most the
agent's ``max_queued_turns`` (``enqueue``; beyond, 429), or interrupts the running turn and goes
first (``interrupt``). An interrupted turn is committed with ``stop_reason: "interrupted"``: its
messages so far, the text the model had streamed, an error result for each tool cut off (their
processes killed by the sandbox when their task is cancelled), and its usage metered.

Idempotency: a send with a key that is running (or queued) joins that run; one that was committed
returns the committed turn; either with a different message is ``IdempotencyConflictError``. So 50
concurrent duplicates make one model call, whatever their ``if_busy``.

Metering: every request that carries the API's token reservation hands it to a ``TurnMeter``,
which ends it whatever happens: with the turn's final usage record (committed with the turn, or
on its own when the turn fails, times out or is cancelled), or, for a request that made no model
call (a replay, a busy session, a bad message), with a record that only ends it.

Events: a turn's events are numbered from the session's sequence, published to the session's
followers (``SessionHost.events``), sent to the request's ``Sink``, and committed with the turn.
A turn that fails after it began ends with a numbered ``error`` event; a refusal before it began
is an event of its request only, with no id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from hyperfleet.errors import (
    BudgetExceededError,
    CapacityError,
    HyperfleetError,
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    SessionBusyError,
    SessionMovedError,
    StaleSessionError,
    TurnQueueFullError,
    TurnTimeoutError,
)
from hyperfleet.metering import Reservation

from . import metrics
from .events import Emit, EventType, event
from .loop import (
    INTERRUPTED,
    INTERRUPTED_TOOL,
    AgentLoop,
    TurnOutcome,
    TurnProgress,
    interrupted_outcome,
)
from .meter import Metering, TurnMeter
from .session import SEQ_BLOCK, Session, digest
from .spec import AgentSpec
from .store import SessionStore, TurnRecord

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1_000_000
TRANSCRIPT_PAGE = 100
QUEUE_RETRY_AFTER_S = 2.0  # a full queue of waiting turns: about one turn's time
# A caller attached to a queued turn (``send``, ``stream``) waits at most this long for it to
# start; a background turn waits as long as the turns before it run. With a turn's own limit
# (an hour at most), the API's call to the replica is bounded (``serve_app.replicas``).
QUEUE_WAIT_MAX_S = 3_600.0
INTERRUPTS_WAITING_MAX = 10  # interrupting turns waiting in one session
SEQ_MARGIN = 64  # event ids kept in hand: a turn's last events never wait on the store

# ``if_busy``: what a message does when its session is running a turn.
IfBusy = Literal["reject", "enqueue", "interrupt"]
IF_BUSY: tuple[IfBusy, ...] = ("reject", "enqueue", "interrupt")
Admitted = Callable[[str, str], None]  # told a turn's id and status once it has a place


class Sink:
    """Where one request's events go: a stream's queue, or nowhere (``send``, background)."""

    def __init__(self, queue: asyncio.Queue[dict[str, Any] | None] | None = None) -> None:
        self._queue = queue
        self.ended = False  # its turn_end or error went out

    async def __call__(self, item: dict[str, Any]) -> None:
        if item["type"] in ("turn_end", "error"):
            self.ended = True
        if self._queue is not None:
            await self._queue.put(item)


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A keyed turn running (or queued) here: a resend with its key joins it."""

    digest: str
    turn_id: str
    future: asyncio.Future[TurnRecord]


class TurnRunner:
    """The turn half of ``SessionHost`` (which holds the sessions and sets these)."""

    agent_id: str
    spec: AgentSpec
    store: SessionStore
    loop: AgentLoop
    workspaces: Path
    draining: bool
    turns_completed: int
    turns_failed: int
    _clock: Callable[[], float]
    _wall: Callable[[], float]
    _metering: Metering | None
    _sessions: dict[str, Session]
    _inflight: dict[tuple[str, str], InFlight]
    # Turns past the draining check, from then to their end (some wait on the store before
    # their session is busy): a drain waits for every one of them.
    _entered: int

    async def _get(self, session_id: str, owner: str | None) -> Session:
        raise NotImplementedError

    def _busy(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.busy

    async def _turn(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        key: str | None,
        owner: str | None,
        sink: Sink,
        reservation: Reservation | None = None,
        if_busy: IfBusy = "reject",
    ) -> tuple[TurnRecord, bool]:
        """Runs (or replays) one turn; the flag says it was replayed, not run."""
        self._check_not_moved(session_id, key, if_busy)
        self._entered += 1
        try:
            return await self._metered_turn(
                session_id, content, key, owner, sink, reservation, if_busy
            )
        finally:
            self._entered -= 1

    def _check_not_moved(self, session_id: str, key: str | None, if_busy: IfBusy) -> None:
        """Raises ``SessionMovedError`` on a draining replica, unless the request joins a turn
        running here by its key, or is refused by the running turn (``reject``): no new turn
        starts or queues on a replica about to stop. Before the meter: the caller keeps the
        turn's reservation and resends to the session's new home."""
        if not self.draining:
            return
        joins = key is not None and (session_id, key) in self._inflight
        if not (joins or (if_busy == "reject" and self._busy(session_id))):
            raise SessionMovedError(
                "this replica is draining; the session moves to another replica",
                retry_after_s=0.0,
                session_id=session_id,
            )

    async def _metered_turn(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        key: str | None,
        owner: str | None,
        sink: Sink,
        reservation: Reservation | None,
        if_busy: IfBusy = "reject",
        on_admit: Admitted | None = None,
    ) -> tuple[TurnRecord, bool]:
        """``on_admit`` (a background turn's) is told the turn's place; without it, a caller is
        attached, and the turn waits in the session's queue at most ``QUEUE_WAIT_MAX_S``."""
        meter = TurnMeter(
            "turn_" + uuid.uuid4().hex,
            owner or "",
            self.agent_id,
            self.spec.model,
            reservation,
            self._metering,
        )
        try:
            wait_s = QUEUE_WAIT_MAX_S if on_admit is None else None
            return await self._join_or_run(
                session_id, content, key, owner, sink, meter, if_busy, on_admit or _ignore, wait_s
            )
        finally:
            if not meter.finalized:  # no model call: the reservation ends here
                await self._meter(meter, in_outbox=False)

    async def _meter(self, meter: TurnMeter, in_outbox: bool) -> None:
        if self._metering is None:
            return
        for charge in meter.unsettled():
            await self._metering.record(charge, in_outbox=False)
        record = meter.final()
        if record is not None:
            await self._metering.record(record, in_outbox)

    async def _join_or_run(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        key: str | None,
        owner: str | None,
        sink: Sink,
        meter: TurnMeter,
        if_busy: IfBusy,
        on_admit: Admitted,
        wait_s: float | None,
    ) -> tuple[TurnRecord, bool]:
        _check_content(content)
        request_digest = digest(content)
        if key is not None:
            running = self._inflight.get((session_id, key))
            if running is not None:
                if running.digest != request_digest:
                    raise IdempotencyConflictError(
                        f"idempotency key {key!r} is in use with a different message"
                    )
                on_admit(running.turn_id, "running")
                turn = await asyncio.shield(running.future)
                metrics.turn_finished(self.spec.model, "replayed")
                await sink(event(turn.last_seq, "turn_end", _turn_end(turn, replayed=True)))
                return turn, True
        future: asyncio.Future[TurnRecord] | None = None
        if key is not None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[(session_id, key)] = InFlight(request_digest, meter.turn_id, future)
        try:
            turn, replayed = await self._run_once(
                session_id,
                content,
                key,
                request_digest,
                owner,
                sink,
                meter,
                if_busy,
                on_admit,
                wait_s,
            )
            if future is not None:
                future.set_result(turn)
            return turn, replayed
        except BaseException as e:
            if future is not None:
                future.set_exception(e)
                future.exception()
            raise
        finally:
            if key is not None:
                self._inflight.pop((session_id, key), None)

    def _admit(self, session: Session, if_busy: IfBusy) -> asyncio.Future[None]:
        """The turn's place at the session's gate: refused (``reject``, or a full queue),
        queued, or at the front after interrupting the running turn."""
        if session.busy:
            if if_busy == "reject":
                raise SessionBusyError("a turn is running in this session", session_id=session.id)
            # Interrupting turns have their own bound: a full queue must not stop a "stop".
            waiting, most = (
                (session.gate.waiting_in_front, INTERRUPTS_WAITING_MAX)
                if if_busy == "interrupt"
                else (
                    session.gate.waiting - session.gate.waiting_in_front,
                    self.spec.max_queued_turns,
                )
            )
            if waiting >= most:
                raise TurnQueueFullError(
                    f"{waiting} turns are waiting in this session ({if_busy}), its most",
                    retry_after_s=QUEUE_RETRY_AFTER_S,
                    session_id=session.id,
                )
            if if_busy == "interrupt":
                session.interrupt()
        return session.gate.ticket(front=if_busy == "interrupt")

    async def _run_once(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        key: str | None,
        request_digest: str,
        owner: str | None,
        sink: Sink,
        meter: TurnMeter,
        if_busy: IfBusy,
        on_admit: Admitted,
        wait_s: float | None,
    ) -> tuple[TurnRecord, bool]:
        session = await self._get(session_id, owner)
        if key is not None:
            committed = await self.store.find_turn(session_id, key)
            if committed is not None:
                if committed.request_digest != request_digest:
                    raise IdempotencyConflictError(
                        f"idempotency key {key!r} was used for a different message"
                    )
                on_admit(committed.turn_id, "completed")
                metrics.turn_finished(self.spec.model, "replayed")
                await sink(
                    event(committed.last_seq, "turn_end", _turn_end(committed, replayed=True))
                )
                return committed, True
        ticket = self._admit(session, if_busy)
        turn_id = meter.turn_id
        status = "running" if ticket.done() else "queued"
        session.note(turn_id, status)
        on_admit(turn_id, status)
        try:
            async with asyncio.timeout(wait_s):
                await ticket
        except TimeoutError as e:
            session.gate.abandon(ticket)
            waited = CapacityError(
                f"the turn waited {wait_s:g} s in the session's queue; send it again later",
                retry_after_s=QUEUE_RETRY_AFTER_S,
                session_id=session_id,
            )
            session.note(turn_id, "failed", error=waited.to_json())
            raise waited from e
        except BaseException as e:
            session.gate.abandon(ticket)
            error = e.to_json() if isinstance(e, HyperfleetError) else _CANCELLED
            session.note(turn_id, "failed", error=error)
            raise
        try:
            if self._sessions.get(session_id) is not session:
                # Defensive: only idle sessions leave memory, and this one was busy throughout.
                raise StaleSessionError(
                    "the session left this replica while this turn waited; send it again",
                    session_id=session_id,
                )
            if session.stale:  # a commit before this turn failed: read what the store has
                await self._read_transcript(session)
            session.note(turn_id, "running")
            turn = await self._execute(session, content, key, request_digest, sink, meter)
        except HyperfleetError as e:
            session.note(turn_id, "failed", error=e.to_json())
            raise
        except BaseException:
            session.note(turn_id, "failed", error=INTERNAL)
            raise
        finally:
            session.end()
        done = "interrupted" if turn.stop_reason == INTERRUPTED else "completed"
        session.note(turn_id, done, index=turn.index)
        return turn, False

    async def _read_transcript(self, session: Session) -> None:
        """(Re)reads the session's committed turns from the store, and reserves its event ids:
        every id a previous owner could have sent is below this owner's range."""
        session.messages = []
        session.version = 0
        session.committed_seq = 0
        after = 0
        while True:
            page = await self.store.list_turns(session.id, after, TRANSCRIPT_PAGE)
            for turn in page:
                session.apply(turn, restore_seq=True)
            if len(page) < TRANSCRIPT_PAGE:
                break
            after = page[-1].index
        top = await self.store.reserve_seq(session.id, SEQ_BLOCK)
        session.seq = max(session.seq, top - SEQ_BLOCK)
        session.seq_limit = top
        session.stale = False

    async def _headroom(self, session: Session) -> None:
        """Keeps event ids in hand for the rest of the turn: a range is reserved in the store
        before the session's run out, so that a turn's last events never wait on it."""
        if session.seq_limit - session.seq >= SEQ_MARGIN:
            return
        top = await self.store.reserve_seq(session.id, SEQ_BLOCK)
        if top - SEQ_BLOCK != session.seq_limit:
            # Another owner reserved ids in between (this one is stale, and its commit will be
            # refused): its ids still go above theirs. Else they go on one by one.
            session.seq = max(session.seq, top - SEQ_BLOCK)
        session.seq_limit = top

    async def _execute(
        self,
        session: Session,
        content: str | list[dict[str, Any]],
        key: str | None,
        request_digest: str,
        sink: Sink,
        meter: TurnMeter,
    ) -> TurnRecord:
        """Runs the admitted turn to its commit (or its interruption's); every event is
        numbered and published to the session's followers, then sent to ``sink``."""
        session_id = session.id
        turn_id = meter.turn_id
        meter.owner = session.record.owner
        session.begin(turn_id)

        async def emit(kind: EventType, data: dict[str, Any]) -> None:
            await self._headroom(session)
            item = event(session.next_seq(), kind, data)
            session.publish(item)
            await sink(item)

        async def fail(error: dict[str, Any]) -> None:
            # Room for it was kept (``_headroom``): the turn's last event waits on nothing.
            item = event(session.next_seq(), "error", error)
            session.publish(item)
            await sink(item)

        await emit("turn_start", {"turn_id": turn_id, "session_id": session_id})
        started = self._clock()
        # Seeded with the message: an interrupt before the loop's first step still commits it.
        progress = TurnProgress(messages=[{"role": "user", "content": content}])
        try:
            async with asyncio.timeout(self.spec.turn_timeout_s):
                session.running = asyncio.create_task(
                    self.loop.run(
                        session.messages,
                        content,
                        session.workspace,
                        self._first_event_timed(emit, started),
                        meter,
                        progress,
                    )
                )
                if session.interrupted == turn_id:  # interrupted before its loop began
                    session.running.cancel()
                try:
                    outcome = await session.running
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if session.interrupted != turn_id or (current and current.cancelling()):
                        raise  # the turn's time limit, or this call cancelled
                    outcome = interrupted_outcome(progress, meter)
                    await self._report_interrupted(outcome, emit)
        except TimeoutError as e:
            self.turns_failed += 1
            metrics.turn_finished(self.spec.model, "timeout")
            await self._meter(meter, in_outbox=False)
            error = TurnTimeoutError(
                f"the turn ran past its {self.spec.turn_timeout_s:g} s limit",
                session_id=session_id,
            )
            await fail({"status_code": error.status_code, **error.to_json()})
            raise error from e
        except BaseException as e:
            # Failed, refused by the budget, or cancelled: its calls are metered all the same.
            self.turns_failed += 1
            metrics.turn_finished(self.spec.model, _failure(e))
            await self._meter(meter, in_outbox=False)
            await fail(_error_data(e))
            raise
        # No reservation here: ``_headroom`` left room for turn_end (or an error).
        turn = TurnRecord(
            session_id=session_id,
            index=session.version + 1,
            turn_id=turn_id,
            request_digest=request_digest,
            messages=outcome.messages,
            stop_reason=outcome.stop_reason,
            usage=outcome.usage.to_json(),
            cost_usd=outcome.usage.cost_usd(self.spec.model),
            model=self.spec.model,
            created_at=self._wall(),
            last_seq=session.seq + 1,
            idempotency_key=key,
            content=outcome.content,
        )
        end = event(turn.last_seq, "turn_end", _turn_end(turn, replayed=False))
        turn = dataclasses.replace(turn, events=[*session.current, end])
        usage = meter.final()
        try:
            await self.store.commit_turn(turn, session.version, usage)
        except BaseException as e:
            if await self._committed_anyway(turn, e) is None:
                # Stale (someone else owns it now) or unknown (the reply was lost and the turn
                # could not be found): the session's transcript is read again before its next
                # turn. Its calls are metered with the record the commit carried: once, either
                # way. The error has no id: if the turn did commit, a resume finds its turn_end.
                session.stale = True
                self.turns_failed += 1
                metrics.turn_finished(self.spec.model, _failure(e))
                await self._meter(meter, in_outbox=False)
                unknown = event(None, "error", _error_data(e))
                session.announce(unknown)
                await sink(unknown)
                raise
        outcome_label: metrics.TurnOutcome = (
            "interrupted" if turn.stop_reason == INTERRUPTED else "committed"
        )
        metrics.turn_finished(self.spec.model, outcome_label, self._clock() - started)
        session.next_seq()
        session.apply(turn, restore_seq=False)
        self.turns_completed += 1
        await self._meter(meter, in_outbox=True)
        session.publish(end)
        await sink(end)
        return turn

    async def _committed_anyway(self, turn: TurnRecord, error: BaseException) -> TurnRecord | None:
        """The turn, if its commit raised ``error`` but happened (a reply lost on the way)."""
        if isinstance(error, (StaleSessionError, IdempotencyConflictError, NotFoundError)):
            return None  # refused: nothing was written
        try:
            found = await self.store.get_turn(turn.session_id, turn.turn_id)
        except HyperfleetError:  # the store is still unreachable: unknown, as before
            return None
        return found

    @staticmethod
    async def _report_interrupted(outcome: TurnOutcome, emit: Emit) -> None:
        """The tools an interruption cut off end with an error result, on the stream too."""
        last = outcome.messages[-1] if outcome.messages else None
        if last is None or last["role"] != "user" or isinstance(last["content"], str):
            return
        for block in last["content"]:
            if block.get("type") == "tool_result" and block.get("content") == INTERRUPTED_TOOL:
                await emit(
                    "tool_result",
                    {
                        "tool_use_id": block["tool_use_id"],
                        "content": INTERRUPTED_TOOL,
                        "is_error": True,
                    },
                )

    def _first_event_timed(self, emit: Emit, started: float) -> Emit:
        """``emit``, observing the time to the turn's first text or tool event."""
        seen = False

        async def timed(kind: EventType, data: dict[str, Any]) -> None:
            nonlocal seen
            if not seen and kind in _FIRST_EVENTS:
                seen = True
                metrics.turn_first_event(self.spec.model, self._clock() - started)
            await emit(kind, data)

        return timed


_FIRST_EVENTS = ("text_delta", "tool_use")

INTERNAL = {"type": "internal_error", "message": "the turn failed", "retryable": False}
_CANCELLED = {"type": "cancelled", "message": "the turn was cancelled", "retryable": True}


def _ignore(turn_id: str, status: str) -> None:
    return None


def _failure(error: BaseException) -> metrics.TurnOutcome:
    """How a turn that raised ``error`` ended, for ``hyperfleet_turns_total``."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, BudgetExceededError):
        return "budget"
    return "failed"


def _error_data(error: BaseException) -> dict[str, Any]:
    """A failed turn's ``error`` event data."""
    if isinstance(error, HyperfleetError):
        return {"status_code": error.status_code, **error.to_json()}
    if isinstance(error, asyncio.CancelledError):
        return {"status_code": 503, **_CANCELLED}
    return {"status_code": 500, **INTERNAL}


def _turn_end(turn: TurnRecord, replayed: bool) -> dict[str, Any]:
    return {**turn.public(), "replayed": replayed}


def _check_content(content: str | list[dict[str, Any]]) -> None:
    if isinstance(content, str):
        if not content.strip():
            raise_invalid("the message is empty")
        if len(content) > MAX_MESSAGE_CHARS:
            raise_invalid(f"the message is over {MAX_MESSAGE_CHARS} characters")
    elif not isinstance(content, list) or not content:
        raise_invalid("the message must be text or a non-empty list of content blocks")


def raise_invalid(message: str) -> None:
    raise InvalidRequestError(message)
