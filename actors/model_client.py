"""A replica's model client, built on a thread so that the replica serves before the client exists.

Importing the Anthropic SDK is most of a replica's start: over 3,000 modules and about 1,400
pydantic models, 2 s of CPU on a 2-core VM, against 0.6 s for Ray to start the actor's process.
Only a model call needs the SDK. So a replica imports it and builds its client on a thread from
``__init__``; meanwhile it opens and reloads sessions and answers health, and the first model call
awaits the client (at most ``CLIENT_START_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from hyperfleet.errors import CapacityError, HyperfleetError

if TYPE_CHECKING:
    import anthropic

CLIENT_START_TIMEOUT_S = 60.0
CLIENT_RETRY_AFTER_S = 5.0


class PendingClient:
    """An ``AsyncAnthropic`` client being built by ``build`` on a daemon thread."""

    def __init__(self, build: Callable[[], anthropic.AsyncAnthropic], name: str) -> None:
        self._future: concurrent.futures.Future[anthropic.AsyncAnthropic] = (
            concurrent.futures.Future()
        )
        thread = threading.Thread(
            target=self._build, args=(build,), name=f"{name}-model-client", daemon=True
        )
        thread.start()

    def _build(self, build: Callable[[], anthropic.AsyncAnthropic]) -> None:
        try:
            self._future.set_result(build())
        except BaseException as e:  # noqa: BLE001 - handed to every caller of get(), which raises it
            self._future.set_exception(e)

    @property
    def state(self) -> str:
        """``loading``, ``ready`` or ``failed``."""
        if not self._future.done():
            return "loading"
        return "failed" if self._future.exception() is not None else "ready"

    async def get(self, timeout_s: float = CLIENT_START_TIMEOUT_S) -> anthropic.AsyncAnthropic:
        """The client, once built.

        Raises:
            CapacityError: not built within ``timeout_s`` (retryable).
            HyperfleetError: building it failed; every later call fails the same way.
        """
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(self._future)), timeout_s
            )
        except TimeoutError as e:
            raise CapacityError(
                f"the replica's model client is still starting after {timeout_s:.0f} s",
                retry_after_s=CLIENT_RETRY_AFTER_S,
            ) from e
        except Exception as e:
            raise HyperfleetError(f"the replica's model client failed to start: {e}") from e

    async def close(self) -> None:
        """Closes the client if it was built; a build still running is left to its thread."""
        if self.state == "ready":
            await self._future.result().close()
