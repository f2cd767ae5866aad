"""Waiting for state, not for time: the bounded polls the integration tests use.

A test that must act once something has happened (a turn is running, a replica restarted, a
workload left Hypercore's List) polls for that state with a deadline, and fails saying what it
waited for and what it saw last. It never sleeps for a guessed time: on a loaded machine a
guess is too short, and on an idle one it is time wasted.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar, cast

T = TypeVar("T")

WAIT_S = 60.0
POLL_S = 0.1


def wait_until(
    check: Callable[[], T | None], what: str, timeout_s: float = WAIT_S, interval_s: float = POLL_S
) -> T:
    """Calls ``check`` until it returns something other than ``None`` or ``False``; returns that.

    Raises:
        AssertionError: ``timeout_s`` passed first; the message names ``what`` and the last result.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout_s, result))
        time.sleep(interval_s)


async def wait_until_async(
    check: Callable[[], T | Awaitable[T | None] | None],
    what: str,
    timeout_s: float = WAIT_S,
    interval_s: float = POLL_S,
) -> T:
    """``wait_until`` for a test's event loop: the loop runs on between checks, and ``check`` may
    be a coroutine function (or return any awaitable, such as a Ray ``ObjectRef``), which the
    deadline bounds too."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            try:
                result = await asyncio.wait_for(result, max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise AssertionError(_timed_out(what, timeout_s, "no answer")) from None
        if result is not None and result is not False:
            return cast(T, result)
        if loop.time() >= deadline:
            raise AssertionError(_timed_out(what, timeout_s, result))
        await asyncio.sleep(interval_s)


def _timed_out(what: str, timeout_s: float, last: object) -> str:
    return f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})"


def processes_with(marker: bytes) -> list[int]:
    """The processes on this machine whose command line contains ``marker`` (a tool's command,
    run by a replica here: the local cluster and the test share the machine)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # it exited while we looked
            continue
    return pids
