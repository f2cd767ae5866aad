"""A session in a replica's memory: its transcript as Messages API messages, its version (the
number of committed turns), its events, and the gate that runs its turns one at a time.

Only committed turns are ever in ``messages``: a turn's messages are appended after the store took
them, so a failed turn leaves no trace and the same message can be sent again.

Events and their ids: every event of a turn (``turn_start`` to ``turn_end`` or ``error``) is
numbered from the session's sequence and kept here, for the turn running and the one before it,
so that a client that lost its stream resumes it (``SessionHost.events``); a finished turn's
events are also committed with it, for any replica to replay. An owner numbers events only inside
a range of ids it reserved in the store (``SessionStore.reserve_seq``): a replica that takes the
session over after a crash starts above every id the dead one could have sent.

Double-texting: the gate queues turns in arrival order, and an interrupting turn goes to the
front; ``interrupt`` cancels the running turn's loop, which the host commits as interrupted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .store import SessionRecord, TurnRecord
from .tools import Workspace

SEQ_BLOCK = 10_000  # event ids reserved at a time: one store write per takeover, mostly
SUBSCRIBER_EVENTS = 1_024  # a follower further behind than this is cut off (it resumes)
STATUSES_KEPT = 64  # turns whose status a replica remembers, per session


def digest(content: str | list[dict[str, Any]]) -> str:
    """Identifies a user message, to tell an idempotent resend from a reused key."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class TurnGate:
    """Admits one turn at a time, in order of arrival; ``front`` turns (interrupting ones) go
    before every other waiting turn, in their own order of arrival."""

    def __init__(self) -> None:
        self._held = False
        self._front: deque[asyncio.Future[None]] = deque()
        self._back: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        return sum(1 for w in (*self._front, *self._back) if not w.done())

    def ticket(self, front: bool = False) -> asyncio.Future[None]:
        """A future that completes when the caller holds the gate (at once when it is free)."""
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._held and not self.waiting:
            self._held = True
            ticket.set_result(None)
        else:
            (self._front if front else self._back).append(ticket)
        return ticket

    @property
    def waiting_in_front(self) -> int:
        return sum(1 for w in self._front if not w.done())

    def abandon(self, ticket: asyncio.Future[None]) -> None:
        """The ticket's holder gave up: granted already, the gate passes on; else it leaves."""
        if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
            self.release()
            return
        ticket.cancel()
        for line in (self._front, self._back):
            if ticket in line:
                line.remove(ticket)

    def fail_waiting(self, error: BaseException) -> int:
        """Turns every waiting ticket away with ``error``; returns how many."""
        failed = 0
        for line in (self._front, self._back):
            while line:
                ticket = line.popleft()
                if not ticket.done():
                    ticket.set_exception(error)
                    failed += 1
        return failed

    def release(self) -> None:
        for line in (self._front, self._back):
            while line:
                following = line.popleft()
                if not following.done():
                    following.set_result(None)  # handed over: the gate stays held
                    return
        self._held = False


@dataclass(eq=False)
class Follower:
    """A client following the session's events live; cut off if it falls too far behind."""

    queue: asyncio.Queue[dict[str, Any] | None] = field(
        default_factory=lambda: asyncio.Queue(SUBSCRIBER_EVENTS)
    )
    cut_off: bool = False

    def put(self, item: dict[str, Any] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.cut_off = True  # it resumes from the last id it got; the turn never waits


@dataclass(eq=False)
class Session:
    record: SessionRecord
    workspace: Workspace
    last_used: float
    messages: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0
    seq: int = 0  # the last event id given out
    seq_limit: int = 0  # ids up to here are this owner's to give (reserved in the store)
    committed_seq: int = 0  # the last event id of the last committed turn
    gate: TurnGate = field(default_factory=TurnGate)
    previous: list[dict[str, Any]] = field(default_factory=list)  # the last turn's events
    current: list[dict[str, Any]] = field(default_factory=list)  # the running turn's
    followers: set[Follower] = field(default_factory=set)
    running: asyncio.Task[Any] | None = None  # the running turn's loop
    running_id: str | None = None
    interrupted: str | None = None  # the running turn being interrupted
    # An interrupt that found no turn to cut (the running one was committing): it applies to the
    # next turn that begins while an interrupting one still waits behind it.
    pending_interrupt: bool = False
    stale: bool = False  # a commit failed: the transcript is read again before the next turn
    statuses: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)

    @property
    def id(self) -> str:
        return self.record.session_id

    @property
    def busy(self) -> bool:
        return self.gate.held

    def apply(self, turn: TurnRecord, restore_seq: bool) -> None:
        """Appends a committed turn; on reload, the event sequence resumes after it."""
        self.messages.extend(turn.messages)
        self.version = turn.index
        self.committed_seq = max(self.committed_seq, turn.last_seq)
        if restore_seq:
            self.seq = max(self.seq, turn.last_seq)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def begin(self, turn_id: str) -> None:
        """A turn starts: the one before it becomes the previous, older events leave memory."""
        if self.current:
            self.previous = self.current
        self.current = []
        self.running_id = turn_id
        cut = self.pending_interrupt and self.gate.waiting_in_front > 0
        self.interrupted = turn_id if cut else None
        self.pending_interrupt = False

    def publish(self, event: dict[str, Any]) -> None:
        self.current.append(event)
        self.announce(event)

    def announce(self, event: dict[str, Any]) -> None:
        """Tells the followers only: an event with no id, not replayed."""
        for follower in self.followers:
            follower.put(event)

    def end(self) -> None:
        """The turn holding the gate ended; followers hear when the session falls idle."""
        self.running = None
        self.running_id = None
        self.gate.release()
        if not self.gate.held:
            for follower in self.followers:
                follower.put(None)

    def interrupt(self) -> None:
        """Cancels the running turn's loop. A turn already committing finishes as it is, and
        the interrupt passes to the turn that begins next, if an interrupting one waits behind
        it (a second "stop" while the first is being handled)."""
        if self.running_id is not None and (self.running is None or not self.running.done()):
            self.interrupted = self.running_id  # before its loop began: cut as it begins
            if self.running is not None:
                self.running.cancel()
        else:
            self.pending_interrupt = True

    def note(self, turn_id: str, status: str, **details: Any) -> None:
        self.statuses[turn_id] = {"turn_id": turn_id, "status": status, **details}
        self.statuses.move_to_end(turn_id)
        while len(self.statuses) > STATUSES_KEPT:
            self.statuses.popitem(last=False)

    def in_memory(self) -> list[dict[str, Any]]:
        """The events this replica still holds: the previous turn's and the running one's."""
        return [*self.previous, *self.current]
