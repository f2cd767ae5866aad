"""A control store that an older Hyperfleet started (it outlives an upgrade: a detached actor)
is refused with a message, at start and by every ingress call, never a 500 per request."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import ray

from hyperfleet.names import NAMESPACE
from serve_app.backend import Control, ControlStoreMismatch, start_control_actor
from serve_app.errors import ApiError

from .conftest import RayCluster


@ray.remote(num_cpus=0)
class OldControlStore:
    """The interface before ``CONTROL_PROTOCOL``: one string-dispatched ``call``."""

    def __init__(self, path: str, redis_url: str | None = None) -> None:
        self.path = path

    def call(self, method: str, *args: Any) -> None:
        return None

    def ping(self) -> str:
        return "ok"


async def test_an_older_control_store_is_refused_with_a_message(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    name = f"control-store-old-{uuid.uuid4().hex[:8]}"
    old = OldControlStore.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(
        str(tmp_path / "control.db")
    )
    try:
        assert await old.ping.remote() == "ok"
        with pytest.raises(ControlStoreMismatch, match="older Hyperfleet started it"):
            start_control_actor(tmp_path / "control.db", name=name)
        with pytest.raises(ApiError) as refused:
            await Control(name=name).get_user("usr_anyone")
        assert refused.value.status_code == 503
        assert "another Hyperfleet version" in str(refused.value)
    finally:
        ray.kill(old, no_restart=True)


async def test_the_current_control_store_is_accepted(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    name = f"control-store-new-{uuid.uuid4().hex[:8]}"
    handle = start_control_actor(tmp_path / "control.db", name=name)
    try:
        assert await handle.ping.remote() == "ok"
        assert start_control_actor(tmp_path / "control.db", name=name) is not None  # found again
    finally:
        ray.kill(handle, no_restart=True)
