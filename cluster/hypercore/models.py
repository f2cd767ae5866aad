"""The typed surface of Hypercore's API: frozen dataclasses, and their protobuf wire form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import proto
from .errors import INVALID_PORT, InvalidSpawnRequest

MAX_PORT = 65535
MAX_UINT32 = 2**32 - 1


def _frozen_ports(ports: Mapping[int, int]) -> Mapping[int, int]:
    return MappingProxyType(dict(sorted(ports.items())))


@dataclass(frozen=True)
class SpawnRequest:
    """What Hypercore can be asked for: cores, memory, an image, a port map and env.

    There is no command override (the image's entrypoint runs), no tags and no GPU field.

    Attributes:
        cores: vCPUs; Hypercore counts them against ``max(host CPUs, 225)``.
        memory_mb: memory in MiB (Hypercore's ``memory``).
        image_ref: a fully qualified image reference, e.g. ``docker.io/library/alpine:latest``.
        ports: host port -> workload port; Hypercore proxies HTTP on the host port.
        env: ``"K=V"`` entries appended to the image's env, echoed back by List exactly.
        dry_run: ask for an empty success without starting anything.
    """

    cores: int
    memory_mb: int
    image_ref: str
    ports: Mapping[int, int] = field(default_factory=dict)
    env: tuple[str, ...] = ()
    dry_run: bool = False

    def __post_init__(self) -> None:
        # A read-only copy: a frozen request must not change under a caller that kept its dict.
        object.__setattr__(self, "ports", _frozen_ports(self.ports))
        object.__setattr__(self, "env", tuple(self.env))

    def validate(self) -> None:
        """Checks what Hypercore would refuse, before a round trip.

        Hypercore's own port check makes the host ignore the request, which surfaces only after
        its query timeout as a vague "no response received from nodes"; checking here gives the
        caller the reason at once.

        Raises:
            InvalidSpawnRequest: a port outside 1..65535, a size outside uint32, an env entry
                without ``=``, or an empty image reference.
        """
        for host_port, workload_port in self.ports.items():
            for port in (host_port, workload_port):
                if not 0 < port <= MAX_PORT:
                    raise InvalidSpawnRequest(INVALID_PORT.format(port=port))
        for name, value in (("cores", self.cores), ("memory_mb", self.memory_mb)):
            if not 0 <= value <= MAX_UINT32:
                raise InvalidSpawnRequest(f"{name} {value} is outside 0..{MAX_UINT32}")
        if not self.image_ref:
            raise InvalidSpawnRequest("image_ref is empty")
        for entry in self.env:
            if "=" not in entry:
                raise InvalidSpawnRequest(f"env entry {entry!r} is not K=V")

    def to_message(self) -> Any:
        """The request as a ``VmSpawnRequest`` message."""
        return proto.VmSpawnRequest(
            cores=self.cores,
            memory=self.memory_mb,
            image_ref=self.image_ref,
            ports=dict(self.ports),
            env=list(self.env),
            dry_run=self.dry_run,
        )

    @classmethod
    def from_message(cls, message: Any) -> SpawnRequest:
        """The request a ``VmSpawnRequest`` message carries."""
        return cls(
            cores=message.cores,
            memory_mb=message.memory,
            image_ref=message.image_ref,
            ports=dict(message.ports),
            env=tuple(message.env),
            dry_run=message.dry_run,
        )


@dataclass(frozen=True)
class Spawned:
    """A started workload: its id (a UUID) and ``<id>.<cluster base url>``.

    Both are empty for a ``dry_run`` spawn.
    """

    id: str
    url: str


@dataclass(frozen=True)
class HostNode:
    """A Hypercore host as Stop returns it: ``id`` is the host's name, new at each daemon start.

    ``ip`` is whatever Hypercore put there (empty from Stop; a batch marker in List), never an IP.
    """

    id: str
    ip: str


@dataclass(frozen=True)
class Workload:
    """A running workload as List shows it: its id and the request it was spawned from."""

    id: str
    request: SpawnRequest


@dataclass(frozen=True)
class HostState:
    """One host's entry in List: its running workloads, as of its last cache refresh.

    Before a host's first refresh its entry is empty (``node_id == ""``, no workloads).
    """

    node_id: str
    node_ip: str
    workloads: tuple[Workload, ...]

    @classmethod
    def from_message(cls, message: Any) -> HostState:
        """The host entry a ``NodeStateResponse`` message carries."""
        return cls(
            node_id=message.node.id,
            node_ip=message.node.ip,
            workloads=tuple(
                Workload(w.id, SpawnRequest.from_message(w.source_request))
                for w in message.workloads
            ),
        )
