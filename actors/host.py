"""What an agent replica does, as a plain class: it hosts sessions and runs their turns.

``AgentActor`` (``actor.py``) is a thin Ray shell over this; everything here is tested without
Ray. Sessions live in memory while used; every committed turn is in the store, so a session that
was evicted (idle past its TTL, or pushed out by a fuller replica), or whose replica restarted,
is reloaded from the store on its next access, transparently.

How a message becomes a committed turn (double-texting, idempotency, interruption, metering,
event numbering) is ``turns.py``; how a session's events are replayed and followed,
``replay.py``. This class holds the sessions and is what a replica's callers see: a turn sent
and answered (``send``), streamed (``stream``) or left to run in the background (``start``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from hyperfleet import logs
from hyperfleet.errors import (
    CapacityError,
    HyperfleetError,
    NotFoundError,
    SessionBusyError,
)
from hyperfleet.metering import Reservation

from . import replay
from .events import event
from .loop import AgentLoop
from .meter import Metering
from .session import SEQ_BLOCK, Session
from .spec import AgentSpec
from .store import SessionRecord, SessionStore
from .tools import Workspace
from .tools.workspace import MIB, remove_tree, sandbox_uid
from .turns import INTERNAL, IfBusy, InFlight, Sink, TurnRunner

logger = logging.getLogger(__name__)

CAPACITY_RETRY_AFTER_S = 5.0
DRAIN_POLL_S = 0.05
DRAINED_RETRY_AFTER_S = 1.0
STREAM_QUEUE_EVENTS = 1_024
TRANSCRIPT_PAGE = 100


class SessionHost(TurnRunner):
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
        self._inflight: dict[tuple[str, str], InFlight] = {}
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
            seq_reserved=SEQ_BLOCK,  # its opener's ids, reserved with it
        )
        await self.store.create_session(record)
        session = self._new_session(record)
        session.seq_limit = SEQ_BLOCK
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
        if session is not None and session.stale and not session.busy:
            del self._sessions[session_id]  # a commit failed: read it again from the store
            session = None
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
            await self._read_transcript(session)
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
        if_busy: IfBusy = "reject",
    ) -> dict[str, Any]:
        turn, replayed = await self._turn(
            session_id, content, idempotency_key, owner, Sink(), reservation, if_busy
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
        if_busy: IfBusy = "reject",
    ) -> AsyncIterator[dict[str, Any]]:
        """Yields the turn's events. If the consumer goes away the turn still completes and is
        committed, so a resend with the same idempotency key gets it, and ``events`` replays
        what the consumer missed. ``trace`` (the request's, ``hyperfleet.logs``) is the log
        context of the turn's task."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(STREAM_QUEUE_EVENTS)
        sink = Sink(queue)

        async def run() -> None:
            try:
                await self._metered_turn(
                    session_id, content, idempotency_key, owner, sink, reservation, if_busy
                )
            except HyperfleetError as e:
                if not sink.ended:  # refused before it started: an event of this request only
                    await sink(event(None, "error", {"status_code": e.status_code, **e.to_json()}))
            except Exception:
                # The stream is a supervisory boundary: a bug ends it with an error event.
                logger.exception("turn in session %s failed", session_id)
                if not sink.ended:
                    await sink(event(None, "error", {"status_code": 500, **INTERNAL}))
            finally:
                self._entered -= 1
                await queue.put(None)

        # Checked here, before the first event, so that a draining replica's refusal is the
        # stream's exception (the caller follows the session), never an error event.
        self._check_not_moved(session_id, idempotency_key, if_busy)
        self._entered += 1
        task = _detached(run(), trace)
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

    async def start(
        self,
        session_id: str,
        content: str | list[dict[str, Any]],
        idempotency_key: str | None = None,
        owner: str | None = None,
        reservation: Reservation | None = None,
        trace: Mapping[str, str] | None = None,
        if_busy: IfBusy = "reject",
    ) -> dict[str, Any]:
        """Starts a background turn: answers as soon as the turn is admitted (``queued`` or
        ``running``; ``completed`` for a key already committed) and runs it to its commit with
        no one attached. A refusal (busy, queue full, conflict) is raised here."""
        self._check_not_moved(session_id, idempotency_key, if_busy)
        admitted: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

        def on_admit(turn_id: str, status: str) -> None:
            if not admitted.done():
                admitted.set_result((turn_id, status))

        async def run() -> None:
            try:
                await self._metered_turn(
                    session_id,
                    content,
                    idempotency_key,
                    owner,
                    Sink(),
                    reservation,
                    if_busy,
                    on_admit,
                )
            finally:
                self._entered -= 1

        def finished(task: asyncio.Task[None]) -> None:
            _BACKGROUND.discard(task)
            error = None if task.cancelled() else task.exception()
            if error is not None and admitted.done():  # its status says so; the log too
                logger.warning("background turn in session %s failed: %r", session_id, error)

        self._entered += 1
        task = _detached(run(), trace)
        _BACKGROUND.add(task)
        task.add_done_callback(finished)
        waits: set[asyncio.Future[Any]] = {admitted, task}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not admitted.done():
            admitted.cancel()
            task.result()  # refused before admission: its error is the answer
        turn_id, status = admitted.result()
        return {"turn_id": turn_id, "session_id": session_id, "status": status}

    async def turn_status(
        self, session_id: str, turn_id: str, owner: str | None = None
    ) -> dict[str, Any]:
        """A turn's status: ``queued``, ``running``, ``failed`` (with its error) from this
        replica's memory, or ``completed`` / ``interrupted`` with the turn, from the store."""
        session = await self._get(session_id, owner)
        return await replay.turn_status(self.store, session, turn_id)

    async def events(
        self, session_id: str, owner: str | None = None, after: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """The session's events with ids above ``after``, then, while a turn runs or waits,
        its events live until the session is idle. Committed turns' events come from the
        store when this replica no longer holds them. A client whose last event belongs to a
        turn that ended without a commit, and that this replica does not hold (it ran on a
        replica that stopped), gets a ``turn_lost`` error: never a silent end."""
        session = await self._get(session_id, owner)
        try:
            async for item in replay.follow(self.store, session, after):
                yield item
        except HyperfleetError:
            raise  # the API's answer: an error event, with its type
        except Exception:
            # A supervisory boundary, as ``stream``: a bug ends the stream with an error event.
            logger.exception("following session %s failed", session_id)
            yield event(None, "error", {"status_code": 500, **INTERNAL, "retryable": True})

    # Operations ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "sessions": len(self._sessions),
            "busy_sessions": sum(1 for s in self._sessions.values() if s.busy),
            "queued_turns": sum(s.gate.waiting for s in self._sessions.values()),
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
        # Turns still waiting behind a running one would be lost with the replica: they are
        # refused instead, retryable (a background one's status says so).
        for session in self._sessions.values():
            session.gate.fail_waiting(
                CapacityError(
                    "this replica stopped before the turn's place in its queue came; send it again",
                    retry_after_s=DRAINED_RETRY_AFTER_S,
                    session_id=session.id,
                )
            )
        await asyncio.sleep(0)  # they leave the gate
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


def _detached(
    turn: Coroutine[Any, Any, None], trace: Mapping[str, str] | None
) -> asyncio.Task[None]:
    """Runs ``turn`` as the replica's own task, not the calling Ray task's. Ray counts every call
    a task makes, from any asyncio task that copied its context, as that task's child; a caller
    cancelled recursively (Serve cancels a request whose HTTP client hung up) would cancel the
    turn's store and control-store calls in flight with it, and fail the turn. In a fresh
    context it is nobody's child. ``trace`` is its log context (``hyperfleet.logs``)."""

    async def run() -> None:
        with logs.traced(**(trace or {})):
            await turn

    return asyncio.get_running_loop().create_task(run(), context=contextvars.Context())


def _drain_in_background(queue: asyncio.Queue[dict[str, Any] | None]) -> None:
    async def drain() -> None:
        while await queue.get() is not None:
            pass

    task = asyncio.get_running_loop().create_task(drain())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()
