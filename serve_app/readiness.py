"""``GET /ready``: whether the stores answer, asked at most once a second per ingress replica.

The route takes no key, since orchestrators probe it, and so it is not admitted: admission
itself costs a control-store call on the default gate, and the control store is one actor that
every request of every tenant goes through. Instead each ingress replica keeps its last answer
for ``READY_CACHE_S``, and requests that arrive while a check runs wait for that check (one
flight): a flood of ``/ready`` makes at most one round of store calls per second per ingress
replica, whatever its rate, and an answer is at most that old.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from hyperfleet.errors import HyperfleetError

READY_CACHE_S = 1.0
READY_CHECK_TIMEOUT_S = 5.0  # a store that does not answer a ping in this long is not ready

Check = Callable[[], Awaitable[object]]


class Readiness:
    """Runs ``checks`` (name -> a call that raises ``HyperfleetError`` when its part is not
    ready) at most once per ``ttl_s``, sharing one run among concurrent callers."""

    def __init__(
        self,
        checks: Mapping[str, Check],
        ttl_s: float = READY_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks = dict(checks)
        self._ttl_s = ttl_s
        self._clock = clock
        self._answer: dict[str, str] | None = None
        self._expires_at = 0.0
        self._running: asyncio.Task[dict[str, str]] | None = None

    async def answer(self) -> dict[str, str]:
        """Each check's ``"ok"`` or what is wrong, at most ``ttl_s`` old."""
        if self._answer is not None and self._clock() < self._expires_at:
            return self._answer
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._run())
        # Shielded: a caller that goes away does not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    async def _run(self) -> dict[str, str]:
        try:
            answer: dict[str, str] = {}
            for name, check in self._checks.items():
                try:
                    await check()
                    answer[name] = "ok"
                except HyperfleetError as e:
                    answer[name] = e.message
            self._answer = answer
            self._expires_at = self._clock() + self._ttl_s
            return answer
        finally:
            self._running = None


async def ping_session_store() -> None:
    """The actor session store's check (the SQLite path's store actor answers a ping)."""
    # Imported here: the store's Ray shell is needed by this check alone.
    from actors.store.actor import ActorSessionStore

    await ActorSessionStore(timeout_s=READY_CHECK_TIMEOUT_S).ping()
