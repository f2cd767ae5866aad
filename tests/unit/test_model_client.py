"""``PendingClient``: a replica's model client, built on a thread while the replica serves."""

from __future__ import annotations

import threading
from typing import Any

import anthropic
import pytest

from actors import HyperfleetError
from actors.model_client import PendingClient
from hyperfleet.errors import CapacityError

BUILD_WAIT_S = 10.0


async def test_get_waits_for_the_build_and_close_closes_the_client() -> None:
    release = threading.Event()

    def build() -> anthropic.AsyncAnthropic:
        assert release.wait(BUILD_WAIT_S)
        return anthropic.AsyncAnthropic(api_key="sk-ant-test", base_url="http://127.0.0.1:9")

    pending = PendingClient(build, "r0")
    assert pending.state == "loading"
    with pytest.raises(CapacityError) as info:  # still loading: a retryable 503, not a hang
        await pending.get(timeout_s=0.05)
    assert info.value.retry_after_s is not None
    release.set()
    client = await pending.get()
    assert pending.state == "ready"
    assert await pending.get() is client  # built once
    await pending.close()
    assert client.is_closed()


async def test_a_failed_build_fails_every_call_with_its_cause() -> None:
    def build() -> Any:
        raise ImportError("no module named anthropic")

    pending = PendingClient(build, "r0")
    for _ in range(2):
        with pytest.raises(HyperfleetError, match="no module named anthropic") as info:
            await pending.get()
        assert not isinstance(info.value, CapacityError)
    assert pending.state == "failed"
    await pending.close()  # nothing to close, and no error
