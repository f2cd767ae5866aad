"""``HypercoreClient``: Spawn, Stop, List and Logs on a Hypercore host, typed.

The client turns dataclasses into Hypercore's messages and back, checks a Spawn request before
sending it, and leaves the wire to a ``Transport`` (gRPC or the HTTP mirror). It is thread-safe:
one gRPC channel or one pool of HTTP connections, shared by every thread.

Hypercore's timings to plan for: Spawn returns once the image is pulled and the workload started
(up to ``SPAWN_TIMEOUT_S`` on a real host), and Stop of an unknown id answers only when its
cluster query times out (also ``SPAWN_TIMEOUT_S``). Pass a ``timeout_s`` above that to those calls
against a real host, or treat ``HypercoreUnavailable`` as "unknown outcome".
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

from . import proto
from .models import HostNode, HostState, Spawned, SpawnRequest
from .transports import GrpcTransport, HttpTransport, Transport

DEFAULT_TIMEOUT_S = 10.0
# Hypercore gives a host 90 s to pull an image and start a workload, and a Stop query 90 s.
SPAWN_TIMEOUT_S = 90.0


class HypercoreClient:
    """A typed client of one Hypercore host's ``ClusterService``.

    Build it with ``connect``; inject another ``Transport`` through the constructor.
    """

    def __init__(self, transport: Transport, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._transport = transport
        self._timeout_s = timeout_s

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        transport: Literal["grpc", "http"] = "grpc",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> HypercoreClient:
        """A client of the host at ``address``.

        Args:
            address: ``HOST:PORT`` of Hypercore's gRPC server (default port 8000) or of its HTTP
                mirror (default port 8001).
            transport: ``"grpc"`` or ``"http"``.
            timeout_s: the default timeout of every call.

        No connection is made here: the first call connects (gRPC channels connect lazily).
        """
        if transport == "grpc":
            return cls(GrpcTransport(address), timeout_s=timeout_s)
        if transport == "http":
            return cls(HttpTransport(address), timeout_s=timeout_s)
        raise ValueError(f"transport must be 'grpc' or 'http', got {transport!r}")

    def _call(self, method: str, request: Any, timeout_s: float | None) -> Any:
        return self._transport.call(
            method, request, self._timeout_s if timeout_s is None else timeout_s
        )

    def spawn(self, request: SpawnRequest, timeout_s: float | None = None) -> Spawned:
        """Starts a workload and returns once it runs.

        Args:
            request: what to run; checked first (``SpawnRequest.validate``).
            timeout_s: this call's timeout (default: the client's).

        Returns:
            The workload's id and url (both empty for ``dry_run``).

        Raises:
            InvalidSpawnRequest: the request is invalid, or the image cannot be pulled.
            CapacityExceeded: the host's vCPUs are taken.
            HypercoreUnavailable: no answer in time (the workload may or may not have started),
                or no host answered.
        """
        request.validate()
        response = self._call("Spawn", request.to_message(), timeout_s)
        return Spawned(id=response.id, url=response.url)

    def stop(self, workload_id: str, timeout_s: float | None = None) -> HostNode:
        """Stops a workload (SIGTERM, SIGKILL 5 s later) and removes it.

        Returns:
            The host that ran it (its name in ``id``).

        Raises:
            UnknownWorkload: no host runs a workload with that id.
        """
        response = self._call("Stop", proto.VmStopRequest(id=workload_id), timeout_s)
        return HostNode(id=response.id, ip=response.ip)

    def list(self, timeout_s: float | None = None) -> list[HostState]:
        """Every host's running workloads, as of each host's last refresh (about every 5 s).

        A workload spawned or stopped since then is not yet reflected, and a host whose first
        refresh has not happened shows as an empty entry.
        """
        response = self._call("List", proto.VmQueryRequest(), timeout_s)
        return [HostState.from_message(state) for state in response.states]

    def logs(self, workload_id: str, timeout_s: float | None = None) -> str:
        """The workload's combined stdout and stderr.

        Raises:
            UnknownWorkload: no such workload (over gRPC: not in the host's cached List yet).
        """
        response = self._call("Logs", proto.VmLogsRequest(id=workload_id), timeout_s)
        logs: str = response.logs
        return logs

    def close(self) -> None:
        """Releases the channel or connections; the client cannot be used afterwards."""
        self._transport.close()

    def __enter__(self) -> HypercoreClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
