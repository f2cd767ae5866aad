"""Following a session to its new home: when the replica a request reaches is draining or gone
(scaled down), the session's route moves to a ready replica and the request goes there.

The control store moves the route (``ControlStore.rehome``), once for every ingress replica: it
moves only off a replica that is not ready, to the least-loaded ready one, so two ingress
replicas that meet the same drain agree on where the session went. A replica that is merely
restarting (Ray restarts it in place) keeps its sessions: its errors are the caller's to answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hyperfleet.errors import HyperfleetError, SessionMovedError

from .admission import Gate
from .backend import Control
from .errors import ApiError
from .records import Route
from .replicas import Pool

logger = logging.getLogger(__name__)

MOVES_MAX = 3  # a request follows its session to a new replica at most this often

T = TypeVar("T")


class Homes:
    def __init__(
        self, control: Control, gate: Gate, pool: Pool | None = None, capacity_wait_s: float = 0
    ) -> None:
        """``pool`` is asked for a replica when a session's replica is gone and none is ready
        to take it (a pool scaled to zero, say), for up to ``capacity_wait_s``."""
        self.control = control
        self.gate = gate
        self.pool = pool
        self.capacity_wait_s = capacity_wait_s

    async def at_home(self, route: Route, call: Callable[[Route], Awaitable[T]]) -> T:
        """``call`` on the session's replica. When that replica is draining (``session_moved``)
        or gone (scaled down), the session's route moves to a ready replica (the control store
        decides, once, for every ingress) and ``call`` runs again there: a client never sees a
        scale-down. A replica that is merely restarting keeps its sessions: that is an error."""
        for _ in range(MOVES_MAX):
            try:
                return await call(route)
            except HyperfleetError as e:
                moved = await self.follow(route, e)
                if moved is None:
                    raise
                route = moved
        return await call(route)

    async def follow(self, route: Route, error: HyperfleetError) -> Route | None:
        """Where the session went, if ``error`` says its replica is draining or gone and the
        control store moved it; else None."""
        gone = isinstance(error, ApiError) and error.error_type == "unavailable"
        if not (gone or isinstance(error, SessionMovedError)):
            return None
        moved = await self.control.rehome(route.id, route.replica)
        stuck = moved is not None and moved.replica == route.replica
        # Draining or gone, and no ready replica to move to (a pool scaled to zero): ask the
        # pool for one (a refusal, for its policy) and move once it is there. A replica that is
        # merely restarting is still ready, and keeps its sessions.
        if (
            stuck
            and self.pool is not None
            and not await self.control.placement(route.agent_id)
            and await self.pool.request_capacity(route.agent_id, self.capacity_wait_s)
        ):
            moved = await self.control.rehome(route.id, route.replica)
        if moved is None or moved.replica == route.replica:
            return None
        self.gate.forget_routes(session_id=route.id)
        logger.info("session %s moved to replica %d", route.id, moved.replica)
        return moved
