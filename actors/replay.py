"""A session's events, replayed and followed: what ``GET /v1/sessions/{id}/events`` reads.

A replica holds the events of a session's running turn and of the turn before it
(``actors.session``); a committed turn's events are in the store with it, so any replica replays
them, the one that ran the turn gone or not. How long they are kept: the running turn's, in the
memory of the replica running it, until it ends (a replica that dies mid-turn takes them along:
that turn did not commit, and a resume says ``turn_lost``); the previous turn's, in memory until
the next one starts or the session leaves memory; every committed turn's, in the store with its
transcript, for as long as the session is kept.

A follower is registered before anything is read, so that an event published meanwhile is not
missed, and events are yielded by increasing id only, so none is sent twice. A follower that
falls ``SUBSCRIBER_EVENTS`` behind is cut off with a ``stream_lagged`` error rather than making
the turn wait: it resumes from its last id.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from hyperfleet.errors import (
    HyperfleetError,
    InvalidRequestError,
    NotFoundError,
    StreamLaggedError,
    TurnLostError,
)

from .events import event
from .loop import INTERRUPTED
from .session import Follower, Session
from .store import SessionStore, TurnRecord

FOLLOW_RECHECK_S = 5.0  # a follower looks at the session itself at least this often
TURNS_PAGE = 100


async def follow(
    store: SessionStore, session: Session, after: int
) -> AsyncIterator[dict[str, Any]]:
    """The session's events with ids above ``after``, then, while a turn runs or waits, its
    events live until the session is idle. A client whose last event belongs to a turn that
    ended without a commit, and that this replica does not hold (it ran on a replica that
    stopped), gets a ``turn_lost`` error first: never a silent end."""
    if after > session.seq:
        raise InvalidRequestError(
            f"event {after} is past this session's last event ({session.seq})"
        )
    follower = Follower()
    session.followers.add(follower)  # before reading: nothing published from now is missed
    try:
        last = after
        held = session.in_memory()
        if not await _kept(store, session, held, after):
            error = TurnLostError(
                f"the turn of event {after} ended without a commit (it failed, or the replica "
                "running it stopped); send its message again (with its idempotency key)",
                session_id=session.id,
            )
            yield event(None, "error", error_data(error))
        if after < session.committed_seq and (not held or held[0]["seq"] > after + 1):
            async for item in committed_events(store, session, after):
                if item["seq"] > last:
                    last = item["seq"]
                    yield item
        for item in session.in_memory():
            if item["seq"] > last:
                last = item["seq"]
                yield item
        while session.busy or not follower.queue.empty():
            if follower.cut_off:
                lagged = StreamLaggedError(
                    "this stream fell too far behind; resume it from its last event id",
                    session_id=session.id,
                )
                yield event(None, "error", error_data(lagged))
                return
            try:
                got = await asyncio.wait_for(follower.queue.get(), FOLLOW_RECHECK_S)
            except TimeoutError:
                continue  # the gate's idle signal is the rule; this bounds a missed one
            if got is None:
                continue
            if got["seq"] is None:  # an error with no id (a commit's outcome unknown)
                yield got
            elif got["seq"] > last:
                last = got["seq"]
                yield got
    finally:
        session.followers.discard(follower)


async def _kept(
    store: SessionStore, session: Session, held: list[dict[str, Any]], after: int
) -> bool:
    """Whether ``after`` is the id of an event this session kept: one in this replica's
    memory, or one of a committed turn. Else its turn never committed (a lost turn)."""
    if after == 0 or after == session.committed_seq or any(e["seq"] == after for e in held):
        return True
    if after > session.committed_seq:
        return False
    index = await _first_turn(store, session, lambda turn: turn.last_seq >= after)
    found = await store.list_turns(session.id, index - 1, 1)
    if not found or not found[0].events:  # a turn committed before events were kept
        return True
    turn = found[0]
    # A turn's ids go one by one: ``after`` is one of them if it is in the turn's range.
    return turn.last_seq == after or turn.events[0]["seq"] <= after


async def _first_turn(
    store: SessionStore, session: Session, reaches: Callable[[TurnRecord], bool]
) -> int:
    """The index of the first committed turn that ``reaches`` (true from some turn on, as
    turns' ids only grow), by bisection: a few one-turn reads, whatever the session's
    length; ``session.version`` when none does."""
    low, high = 1, session.version
    while low < high:
        middle = (low + high) // 2
        probe = await store.list_turns(session.id, middle - 1, 1)
        if probe and reaches(probe[0]):
            high = middle
        else:
            low = middle + 1
    return low


async def committed_events(
    store: SessionStore, session: Session, after: int
) -> AsyncIterator[dict[str, Any]]:
    """Committed turns' events with ids above ``after``, from the store."""
    index = await _first_turn(store, session, lambda turn: turn.last_seq > after) - 1
    while index < session.version:
        page = await store.list_turns(session.id, index, TURNS_PAGE)
        if not page:
            return
        for turn in page:
            for item in turn.events:
                if item["seq"] > after:
                    yield item
        index = page[-1].index


async def turn_status(store: SessionStore, session: Session, turn_id: str) -> dict[str, Any]:
    """A turn's status: ``queued``, ``running``, ``failed`` (with its error) from this
    replica's memory, or ``completed`` / ``interrupted`` with the turn, from the store."""
    known = session.statuses.get(turn_id)
    if known is not None and known["status"] in ("queued", "running", "failed"):
        return {**known, "session_id": session.id}
    turn = await store.get_turn(session.id, turn_id)
    if turn is None:
        raise NotFoundError(
            f"no turn {turn_id} in session {session.id} (a turn whose replica stopped "
            "before it committed is not kept: send its message again)"
        )
    status = "interrupted" if turn.stop_reason == INTERRUPTED else "completed"
    return {"turn_id": turn_id, "session_id": session.id, "status": status, "turn": turn.public()}


def error_data(error: HyperfleetError) -> dict[str, Any]:
    return {"status_code": error.status_code, **error.to_json()}
