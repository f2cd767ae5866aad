"""The HTTP app's control store without Ray, for the unit tier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve_app.control import ControlStore


class InProcessControl:
    """``serve_app.backend.Control`` without Ray: each method is the store's, awaited."""

    def __init__(self, store: ControlStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._store, name)

        async def call(*args: Any) -> Any:
            return method(*args)

        return call

    def release_soon(self, reservation: Any) -> None:
        self._store.release(reservation)
