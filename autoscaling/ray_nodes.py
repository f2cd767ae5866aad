"""Node addresses from Ray's own node table, matched by the instance id the node agent exports.

Hypercore's List has no workload address, so the provider asks the cluster's GCS (the same
``GetClusterStatus`` reply autoscaler v2 reads) which live Ray node carries
``RAY_CLOUD_INSTANCE_ID == node_id``. This works where the provider runs inside the head's
autoscaler (the head's node agent exports ``HYPERFLEET_HEAD_ADDRESS`` and the Ray token settings to
it); elsewhere, e.g. during ``ray up`` on the operator's machine, the address is not known yet.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

GCS_TIMEOUT_S = 5
# Addresses of live nodes do not change; a short TTL only bounds the reads per autoscaler tick.
ADDRESS_CACHE_TTL_S = 2.0


class RayNodeTable:
    """Instance id -> node IP of the live Ray nodes, read from the GCS at ``gcs_address``."""

    def __init__(self, gcs_address: str | None) -> None:
        self._gcs_address = gcs_address
        self._lock = threading.Lock()
        self._addresses: dict[str, str] = {}
        self._read_at = float("-inf")
        self._client: Any = None  # ray._raylet.GcsClient, made on first use

    def address_of(self, instance_id: str) -> str | None:
        """The node IP of the live Ray node started for ``instance_id``; None until it joined."""
        if self._gcs_address is None:
            return None
        with self._lock:
            if time.monotonic() - self._read_at > ADDRESS_CACHE_TTL_S:
                self._addresses = self._read()
                self._read_at = time.monotonic()
            return self._addresses.get(instance_id)

    def _read(self) -> dict[str, str]:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
        from ray.core.generated import autoscaler_pb2

        proto: Any = autoscaler_pb2  # generated without type stubs

        if self._client is None:
            self._client = GcsClient(address=self._gcs_address)
        try:
            raw = self._client.get_cluster_status(timeout_s=GCS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - Ray raises its own RpcError/TimeoutError types
            # An address is an optimisation for Ray's callers (None means "not known yet"), so a
            # GCS hiccup must not fail the autoscaler's tick; the next call reads again.
            logger.warning("cannot read Ray's node table from %s: %s", self._gcs_address, e)
            return self._addresses
        reply = proto.GetClusterStatusReply()
        reply.ParseFromString(raw)
        dead = proto.NodeStatus.Value("DEAD")
        return {
            node.instance_id: node.node_ip_address
            for node in reply.cluster_resource_state.node_states
            if node.instance_id and node.status != dead
        }
