"""The session's real Ray cluster is up and usable from tests."""

from __future__ import annotations

import ray

from .conftest import RayCluster


def test_session_cluster_runs_tasks(ray_cluster: RayCluster) -> None:
    assert ray_cluster.gcs_port != 6379

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)], timeout=60) == [0, 1, 4, 9]
    assert ray.cluster_resources()["CPU"] >= 1
