"""What an agent replica does, as a plain class: it hosts sessions and runs their turns.

``AgentActor`` (``actor.py``) is a thin Ray shell over this; everything here is tested without
Ray. Sessions live in memory while used; every committed turn is in the store, so a session that
was evicted (idle past its TTL, or pushed out by a fuller replica), or whose replica restarted,
is reloaded from the store on its next access, transparently.

Idempotency: a send with a key that is running joins that run; one that was committed returns the
committed turn; either with a different message is ``IdempotencyConflictError``. So 50 concurrent
duplicates make one model call.

Metering: every request that carries the API's token reservation hands it to a ``TurnMeter``,
which ends it whatever happens: with the turn's final usage record (committed with the turn, or
on its own when the turn fails, times out or is cancelled), or, for a request that made no model
call (a replay, a busy session, a bad message), with a record that only ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from hyperfleet import logs
from hyperfleet.errors import (
    BudgetExceededError,
    CapacityError,
    HyperfleetError,
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    SessionBusyError,
    SessionMovedError,
    TurnTimeoutError,
)
from hyperfleet.metering import Reservation

from . import metrics
from .events import Emit, EventType, event
from .loop import AgentLoop
from .meter import Metering, TurnMeter
from .session import Session, digest
from .spec import AgentSpec
from .store import SessionRecord, SessionStore, TurnRecord
from .tools import Workspace
from .tools.workspace import MIB, remove_tree, sandbox_uid

logger = logging.getLogger(__name__)

CAPACITY_RETRY_AFTER_S = 5.0
DRAIN_POLL_S = 0.05
STREAM_QUEUE_EVENTS = 1_024
MAX_MESSAGE_CHARS = 1_000_000
TRANSCRIPT_PAGE = 100


class SessionHost:
    def __init__(
        self,
        agent_id: str,
        spec: AgentSpec,
        store: SessionStore,
        loop: AgentLoop,
        workspaces: Path,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        metering: Metering | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.spec = spec
        self.store = store
        self.loop = loop
        self.workspaces = workspaces
        self._clock = clock
        self._wall = wall_clock
        # Where the turns' usage goes (None: nowhere, a host without a control plane).
        self._metering = metering
        self._sessions: dict[str, Session] = {}
        self._loading: dict[str, asyncio.Future[Session]] = {}
        self._inflight: dict[tuple[str, str], tuple[str, asyncio.Future[TurnRecord]]] = {}
        self.draining = False
        # Turns past the draining check, from then to their end (some wait on the store before
        # their session is busy): a drain waits for every one of them.
        self._entered = 0
        self.retired = False  # the agent is being deleted: its workspaces are gone for good
        self.turns_completed = 0
        self.turns_failed = 0

    # Sessions -----------------------------------------------------------------------------

    async def open_session(
        self, owner: str, session_id: str | None = None, evict: bool = True
    ) -> dict[str, Any]:
        """Opens a session here. A full replica makes room by evicting its least recently used
        idle session (it reloads on its next access) only with ``evict``: the API first looks
        for a replica with room, and for a new one from the pool controller, and evicts only
        when the pool cannot grow."""
        if self.draining:
            raise CapacityError("this replica is draining", retry_after_s=CAPACITY_RETRY_AFTER_S)
        full = len(self._sessions) >= self.spec.max_sessions
        if full and not (evict and self._evict_one()):
            raise CapacityError(
                f"this replica hosts its maximum of {self.spec.max_sessions} sessions",
                retry_after_s=CAPACITY_RETRY_AFTER_S,
            )
        record = SessionRecord(
            session_id=session_id or "ses_" + uuid.uuid4().hex,
            agent_id=self.agent_id,
            owner=owner,
            created_at=self._wall(),
        )
        await self.store.create_session(record)
        session = self._new_session(record)
        self._sessions[record.session_id] = session
        return {"id": record.session_id, "agent_id": self.agent_id, "created_at": record.created_at}

    def _new_session(self, record: SessionRecord) -> Session:
        if self.retired:  # a request racing the agent's deletion must not recreate its files
            raise NotFoundError(f"no session {record.session_id}: its agent is deleted")
        workspace = Workspace(
            self.workspaces / self.agent_id / record.session_id,
            sandbox_uid(self.spec.egress),
            disk_quota_bytes=self.spec.tool_limits.disk_mb * MIB,
        )
        workspace.create()
        return Session(record=record, workspace=workspace, last_used=self._clock())

    async def _get(self, session_id: str, owner: str | None) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            session = await self._load(session_id)
        if owner is not None and session.record.owner != owner:
            raise NotFoundError(f"no session {session_id}")
        session.last_used = self._clock()
        return session

    async def _load(self, session_id: str) -> Session:
        """Reloads a session from the store; concurrent loads of one session share one read."""
        pending = self._loading.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._loading[session_id] = future
        try:
            record = await self.store.get_session(session_id)
            if record is None or record.closed or record.agent_id != self.agent_id:
                raise NotFoundError(f"no session {session_id}")
            if len(self._sessions) >= self.spec.max_sessions and not self._evict_one():
                raise CapacityError("this replica is full", retry_after_s=CAPACITY_RETRY_AFTER_S)
            session = self._new_session(record)
            after = 0
            while True:
                page = await self.store.list_turns(session_id, after, TRANSCRIPT_PAGE)
                for turn in page:
                    session.apply(turn, restore_seq=True)
                if len(page) < TRANSCRIPT_PAGE:
                    break
                after = page[-1].index
            self._sessions[session_id] = session
            future.set_result(session)
            return session
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._loading[session_id]

    def _evict_one(self) -> bool:
        """Frees a slot by evicting the least recently used idle session."""
        idle = [s for s in self._sessions.values() if not s.busy]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        del self._sessions[victim.id]
        return True

    def evict_idle(self) -> int:
        """Drops sessions idle past the TTL from memory; they reload on their next access."""
        cutoff = self._clock() - self.spec.session_idle_ttl_s
        stale = [s.id for s in self._sessions.values() if not s.busy and s.last_used < cutoff]
        for session_id in stale:
            del self._sessions[session_id]
        return len(stale)

    async def close_session(self, session_id: str, owner: str | None = None) -> None:
        session = await self._get(session_id, owner)
        if session.busy:
            raise SessionBusyError("a turn is running in this session", session_id=session_id)
        await self.store.close_session(session_id)
        self._sessions.pop(session_id, None)
        # The transcript stays in the store; the workspace's files go with the session.
        await asyncio.to_thread(remove_tree, session.workspace.root)

    async def transcript(
        self, session_id: str, owner: str | None = None, after: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        session = await self._get(session_id, owner)
        turns = await self.store.list_turns(session_id, after, limit)
        return {
            "session_id": session_id,
            "version": session.version,
            "turns": [{**t.public(), "messages": t.messages} for t in turns],
            "has_more": bool(turns) and turns[-1].index < session.version,
        }

    # Turns --------------------------------------------------------------------------------

    async def send(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        idempotency_key: str | None = None,
        owner: str | None = None,
        reservation: Reservation | None = None,
    ) -> dict[str, Any]:
        async def ignore(kind: EventType, data: dict[str, Any]) -> None:
            return None

        turn, replayed = await self._turn(
            session_id, content, idempotency_key, owner, ignore, reservation
        )
        return {**turn.public(), "replayed": replayed}

    async def stream(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        idempotency_key: str | None = None,
        owner: str | None = None,
        reservation: Reservation | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yields the turn's events. If the consumer goes away the turn still completes and is
        committed, so a resend with the same idempotency key gets it. ``trace`` (the request's,
        ``hyperfleet.logs``) is the log context of the turn's task."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(STREAM_QUEUE_EVENTS)

        async def emit(kind: EventType, data: dict[str, Any]) -> None:
            session = self._sessions.get(session_id)
            number = session.next_seq() if session is not None else 0
            await queue.put(event(number, kind, data))

        async def run() -> None:
            try:
                await self._metered_turn(
                    session_id, content, idempotency_key, owner, emit, reservation
                )
            except HyperfleetError as e:
                await emit("error", {"status_code": e.status_code, **e.to_json()})
            except Exception:
                # The stream is a supervisory boundary: a bug ends it with an error event.
                logger.exception("turn in session %s failed", session_id)
                error = {"type": "internal_error", "message": "the turn failed", "retryable": False}
                await emit("error", {"status_code": 500, **error})
            finally:
                self._entered -= 1
                await queue.put(None)

        # Checked here, before the first event, so that a draining replica's refusal is the
        # stream's exception (the caller follows the session), never an error event.
        self._check_not_moved(session_id)
        self._entered += 1
        with logs.traced(**(trace or {})):
            task = asyncio.create_task(run())  # it keeps the trace: a task copies its context
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            if not task.done():
                # Keep the turn running to its commit; drop what would have been streamed.
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
                while not queue.empty():
                    queue.get_nowait()
                _drain_in_background(queue)
            await asyncio.sleep(0)

    async def _turn(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        key: str | None,
        owner: str | None,
        emit: Any,
        reservation: Reservation | None = None,
    ) -> tuple[TurnRecord, bool]:
        """Runs (or replays) one turn; the flag says it was replayed, not run."""
        self._check_not_moved(session_id)
        self._entered += 1
        try:
            return await self._metered_turn(session_id, content, key, owner, emit, reservation)
        finally:
            self._entered -= 1

    def _check_not_moved(self, session_id: str) -> None:
        """Raises ``SessionMovedError`` on a draining replica, unless the session's turn is
        running here (it finishes here; a resend with its key joins it). Before the meter: the
        caller keeps the turn's reservation and resends to the session's new home."""
        if self.draining and not self._busy(session_id):
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
        emit: Any,
        reservation: Reservation | None,
    ) -> tuple[TurnRecord, bool]:
        meter = TurnMeter(
            "turn_" + uuid.uuid4().hex,
            owner or "",
            self.agent_id,
            self.spec.model,
            reservation,
            self._metering,
        )
        try:
            return await self._join_or_run(session_id, content, key, owner, emit, meter)
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
        emit: Any,
        meter: TurnMeter,
    ) -> tuple[TurnRecord, bool]:
        _check_content(content)
        request_digest = digest(content)
        if key is not None:
            running = self._inflight.get((session_id, key))
            if running is not None:
                if running[0] != request_digest:
                    raise IdempotencyConflictError(
                        f"idempotency key {key!r} is in use with a different message"
                    )
                turn = await asyncio.shield(running[1])
                metrics.turn_finished(self.spec.model, "replayed")
                await emit("turn_end", _turn_end(turn, replayed=True))
                return turn, True
        future: asyncio.Future[TurnRecord] | None = None
        if key is not None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[(session_id, key)] = (request_digest, future)
        try:
            turn, replayed = await self._run_once(
                session_id, content, key, request_digest, owner, emit, meter
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

    async def _run_once(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        key: str | None,
        request_digest: str,
        owner: str | None,
        emit: Any,
        meter: TurnMeter,
    ) -> tuple[TurnRecord, bool]:
        session = await self._get(session_id, owner)
        if key is not None:
            committed = await self.store.find_turn(session_id, key)
            if committed is not None:
                if committed.request_digest != request_digest:
                    raise IdempotencyConflictError(
                        f"idempotency key {key!r} was used for a different message"
                    )
                metrics.turn_finished(self.spec.model, "replayed")
                await emit("turn_end", _turn_end(committed, replayed=True))
                return committed, True
        if session.busy:
            raise SessionBusyError("a turn is running in this session", session_id=session_id)
        async with session.turn_lock:
            turn_id = meter.turn_id
            meter.owner = session.record.owner
            await emit("turn_start", {"turn_id": turn_id, "session_id": session_id})
            started = self._clock()
            try:
                async with asyncio.timeout(self.spec.turn_timeout_s):
                    outcome = await self.loop.run(
                        session.messages,
                        content,
                        session.workspace,
                        self._first_event_timed(emit, started),
                        meter,
                    )
            except TimeoutError as e:
                self.turns_failed += 1
                metrics.turn_finished(self.spec.model, "timeout")
                await self._meter(meter, in_outbox=False)
                raise TurnTimeoutError(
                    f"the turn ran past its {self.spec.turn_timeout_s:g} s limit",
                    session_id=session_id,
                ) from e
            except BaseException as e:
                # Failed, refused by the budget, or cancelled: its calls are metered all the same.
                self.turns_failed += 1
                metrics.turn_finished(self.spec.model, _failure(e))
                await self._meter(meter, in_outbox=False)
                raise
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
            usage = meter.final()
            try:
                await self.store.commit_turn(turn, session.version, usage)
            except BaseException as e:
                # Stale (someone else owns it now) or unknown (the reply was lost, the commit may
                # have happened): forget our copy either way; it reloads from the store next time.
                # Its calls are metered with the same record the commit carried: once, either way.
                self._sessions.pop(session_id, None)
                self.turns_failed += 1
                metrics.turn_finished(self.spec.model, _failure(e))
                await self._meter(meter, in_outbox=False)
                raise
            metrics.turn_finished(self.spec.model, "committed", self._clock() - started)
            session.apply(turn, restore_seq=False)
            self.turns_completed += 1
            await self._meter(meter, in_outbox=True)
            await emit("turn_end", _turn_end(turn, replayed=False))
            return turn, False

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

    # Operations ---------------------------------------------------------------------------

    def _busy(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.busy

    def stats(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "sessions": len(self._sessions),
            "busy_sessions": sum(1 for s in self._sessions.values() if s.busy),
            "capacity": self.spec.max_sessions,
            "draining": self.draining,
            "turns_completed": self.turns_completed,
            "turns_failed": self.turns_failed,
            "breaker": self.loop.breaker.state,
        }

    async def drain(self, deadline_s: float) -> list[str]:
        """Stops taking sessions, lets running turns finish (up to ``deadline_s``), then hands
        every session back to the store; returns their ids."""
        self.draining = True
        deadline = self._clock() + deadline_s
        # Polled: turns finish on their own schedule and the deadline bounds the wait.
        while (self._entered or any(s.busy for s in self._sessions.values())) and (  # noqa: ASYNC110
            self._clock() < deadline
        ):
            await asyncio.sleep(DRAIN_POLL_S)
        handed = [s.id for s in self._sessions.values() if not s.busy]
        for session_id in handed:
            del self._sessions[session_id]
        return handed

    async def purge(self) -> None:
        """Removes this agent's workspace files on this node (the agent is being deleted; its
        transcripts stay in the store), and from then on loads no session, so that nothing
        writes them back. Call after ``drain``."""
        self.retired = True
        await asyncio.to_thread(remove_tree, self.workspaces / self.agent_id)


_FIRST_EVENTS = ("text_delta", "tool_use")


def _failure(error: BaseException) -> metrics.TurnOutcome:
    """How a turn that raised ``error`` ended, for ``hyperfleet_turns_total``."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, BudgetExceededError):
        return "budget"
    return "failed"


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


def _drain_in_background(queue: asyncio.Queue[dict[str, Any] | None]) -> None:
    async def drain() -> None:
        while await queue.get() is not None:
            pass

    task = asyncio.get_running_loop().create_task(drain())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()
