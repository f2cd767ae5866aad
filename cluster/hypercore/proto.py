"""Hypercore's protobuf messages and gRPC method table, built from ``cluster.proto`` at import.

No generated code is committed: ``grpc_tools.protoc`` compiles the ``.proto`` beside this module
into a descriptor set in memory, and the message classes come from protobuf's message factory.
The gRPC client and server use these classes with explicit method paths, so there is no generated
stub module either. Messages are dynamic classes: mypy sees them as ``Any``; the typed surface is
the frozen dataclasses in ``models``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

PROTO_FILE = Path(__file__).with_name("cluster.proto")
PACKAGE = "cluster.services.api"
SERVICE = f"{PACKAGE}.ClusterService"


class ProtoLoadError(RuntimeError):
    """``cluster.proto`` did not compile (a broken install, or a bad edit of the file)."""


def _compile(proto_file: Path) -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory(prefix="hyperfleet-proto-") as tmp:
        out = Path(tmp) / "cluster.desc"
        argv = [
            "grpc_tools.protoc",
            f"--proto_path={proto_file.parent}",
            f"--descriptor_set_out={out}",
            proto_file.name,
        ]
        if protoc.main(argv) != 0:
            raise ProtoLoadError(f"protoc could not compile {proto_file}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _messages(proto_file: Path) -> dict[str, Any]:
    # A private pool: the names cannot collide with another copy of Hypercore's proto loaded in
    # the same process (grpcio-tools registers its own protos in the default pool).
    pool = descriptor_pool.DescriptorPool()
    for file in _compile(proto_file).file:
        pool.Add(file)
    file_descriptor = pool.FindFileByName(proto_file.name)
    return {
        name: message_factory.GetMessageClass(descriptor)
        for name, descriptor in file_descriptor.message_types_by_name.items()
    }


_CLASSES = _messages(PROTO_FILE)

VmSpawnRequest: Any = _CLASSES["VmSpawnRequest"]
VmSpawnResponse: Any = _CLASSES["VmSpawnResponse"]
VmStopRequest: Any = _CLASSES["VmStopRequest"]
VmLogsRequest: Any = _CLASSES["VmLogsRequest"]
VmLogsResponse: Any = _CLASSES["VmLogsResponse"]
VmQueryRequest: Any = _CLASSES["VmQueryRequest"]
Node: Any = _CLASSES["Node"]
NodesStateResponse: Any = _CLASSES["NodesStateResponse"]
NodeStateResponse: Any = _CLASSES["NodeStateResponse"]
WorkloadState: Any = _CLASSES["WorkloadState"]
BeaconMetadata: Any = _CLASSES["BeaconMetadata"]


@dataclass(frozen=True)
class Method:
    """One unary rpc of ``ClusterService``: its full path and message classes."""

    name: str
    request: Any
    response: Any

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.name}"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("Spawn", VmSpawnRequest, VmSpawnResponse),
        Method("Stop", VmStopRequest, Node),
        Method("List", VmQueryRequest, NodesStateResponse),
        Method("Logs", VmLogsRequest, VmLogsResponse),
    )
}
