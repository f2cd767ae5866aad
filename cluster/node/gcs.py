"""Ray's node table, asked straight from the GCS over gRPC with the cluster's token.

Ray's raylet reads ``RAY_CLOUD_INSTANCE_ID`` from its env into ``GcsNodeInfo.instance_id``, the
field autoscaler v2 matches provider instances on; the join service and the node agent ask the
same table which nodes an instance has had. A node that registered stays listed after it died
(the GCS keeps its dead nodes), so the table answers both "is it alive?" and "did it ever join?".

Plain gRPC rather than Ray's ``GcsClient``: that one reads the token from the process's env, and
neither caller is a Ray process. The protobuf modules are Ray's own, pinned with it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperfleet.errors import HyperfleetError

GCS_TIMEOUT_S = 5.0
# The whole node table (alive nodes and up to 1000 dead ones, by Ray's default): past gRPC's
# default 4 MiB on a large cluster. Ray's own clients allow 512 MiB.
MAX_REPLY_BYTES = 256 * 1024 * 1024


class GcsUnavailable(HyperfleetError):
    """The GCS did not answer, or refused."""


@dataclass(frozen=True)
class GcsNode:
    node_id: bytes
    alive: bool


def _generated(module: str) -> Any:
    return importlib.import_module(f"ray.core.generated.{module}")


def instance_nodes(
    gcs_address: str,
    token_path: Path,
    instance_id: str,
    *,
    node_ip: str | None = None,
    timeout_s: float = GCS_TIMEOUT_S,
) -> list[GcsNode]:
    """The nodes, alive or dead, that the GCS at ``gcs_address`` lists for ``instance_id`` (and
    at ``node_ip``, if given).

    Raises:
        GcsUnavailable: the token could not be read, or the GCS did not answer in ``timeout_s``
            or refused.
    """
    import grpc

    gcs_pb2, service_pb2 = _generated("gcs_pb2"), _generated("gcs_service_pb2")
    selectors = []
    if node_ip is not None:
        selectors.append(service_pb2.GetAllNodeInfoRequest.NodeSelector(node_ip_address=node_ip))
    request = service_pb2.GetAllNodeInfoRequest(node_selectors=selectors)
    try:
        token = token_path.read_text().strip()
        options = [("grpc.max_receive_message_length", MAX_REPLY_BYTES)]
        with grpc.insecure_channel(gcs_address, options=options) as channel:
            stub = _generated("gcs_service_pb2_grpc").NodeInfoGcsServiceStub(channel)
            reply = stub.GetAllNodeInfo(
                request, timeout=timeout_s, metadata=(("authorization", f"Bearer {token}"),)
            )
    except (grpc.RpcError, OSError) as e:
        raise GcsUnavailable(f"no answer from the GCS at {gcs_address}: {e}") from e
    if reply.status.code != 0:
        raise GcsUnavailable(f"the GCS at {gcs_address} refused: {reply.status.message}")
    alive = gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE
    return [
        GcsNode(node.node_id, node.state == alive)
        for node in reply.node_info_list
        if node.instance_id == instance_id
    ]
