"""Spare Ray worker processes on a node, so a replica placed there skips the process start.

An agent replica is a new Ray actor, and Ray starts a new worker process for it unless its raylet
has an idle one that was never used: a worker that ran a task cannot become an actor, and an
actor's worker dies with it. Starting that process (Python, then ``ray`` and its core worker) was
most of a replica's start on a warm node: 0.6-1.0 s of 1.1-1.3 s on this machine. Ray prestarts
workers only when a node's first driver starts, and worker nodes never host a driver.

So the node agent keeps ``HYPERFLEET_WARM_WORKERS`` never-used workers (default 1) on its node. It
asks its own raylet, over the raylet's gRPC API with the cluster's token, for the node's workers
(``GetNodeStats``) every ``POLL_S``; a spare is a plain worker with no job and no actor yet. When
there are fewer spares than the target, it asks the raylet to start the difference
(``PrestartWorkers``, the call Ray's core worker makes for its task backlog), with no job and an
empty runtime env, which is what an agent replica asks for: any job's actor can then take them.
A spare costs an idle Python process (about 80 MB resident) and no Ray resources, so it neither
blocks scheduling nor keeps an idle node from being scaled down (the autoscaler test drains such
a node).

Both RPCs are Ray's internal API (``ray.core.generated``), pinned by the ``ray`` version in
``pyproject.toml``; if they fail (the raylet refuses them, the token file is unreadable) the node
runs as before, without spares, with a warning logged.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("hyperfleet.node")

POLL_S = 1.0
# Until the raylet first answers: a new node's first replica is on its way by then, and a spare
# that registers first serves it (the raylet hands a registering worker to any waiting lease).
STARTUP_POLL_S = 0.2
RPC_TIMEOUT_S = 5.0
# A requested worker counts as on its way for this long (Ray's own start takes 0.5-2 s here);
# after that a missing one is requested again.
START_WINDOW_S = 10.0
# How long the raylet keeps a spare even when its idle workers exceed its soft limit (its CPU
# count); after that it may reap it, and the keeper asks for another. It also bounds how long a
# spare too many (see ``decide``) lives.
KEEP_ALIVE_S = 600
_NIL_BYTE = 0xFF  # Ray's nil ids are all 0xff bytes


@dataclass(frozen=True)
class WorkerInfo:
    """One worker process of a node, as its raylet reports it."""

    pid: int
    is_plain_worker: bool  # not a driver, not an I/O worker
    job_id: bytes
    actor_id: bytes

    @property
    def is_spare(self) -> bool:
        """Never assigned: no job and no actor, so an actor of any job can take it. (The raylet
        reports a worker whose stats call failed as an empty entry: never a spare.)"""
        return (
            self.pid > 0
            and self.is_plain_worker
            and _is_nil(self.job_id)
            and _is_nil(self.actor_id)
        )


def _is_nil(ray_id: bytes) -> bool:
    return bool(ray_id) and all(b == _NIL_BYTE for b in ray_id)


@dataclass(frozen=True)
class WarmState:
    """The keeper's memory between rounds.

    ``coming``: workers requested and not seen yet, as of ``requested_at`` (monotonic s);
    ``seen``: the pids of the node's plain workers last round, so a new pid counts as one that
    arrived.
    """

    coming: int = 0
    requested_at: float | None = None
    seen: frozenset[int] = frozenset()


def decide(
    target: int, workers: Iterable[WorkerInfo], state: WarmState, now: float
) -> tuple[int, WarmState]:
    """How many workers to prestart now, and the keeper's next state.

    A requested worker counts as coming until a new worker shows up (as a spare, or already
    taken by an actor between two rounds) or ``START_WINDOW_S`` passes: a slow start is not
    requested twice, and a spare taken at once is replaced on the next round. A worker Ray
    started on its own meanwhile (for a replica that found no spare) can be mistaken for ours:
    each such one may add a spare too many, which the raylet may reap once its
    ``KEEP_ALIVE_S`` ends; rounds never start more while the spares reach the target.
    """
    workers = list(workers)
    spares = sum(1 for w in workers if w.is_spare)
    plain = frozenset(w.pid for w in workers if w.is_plain_worker)
    coming = 0
    if state.requested_at is not None and now - state.requested_at < START_WINDOW_S:
        coming = max(0, state.coming - len(plain - state.seen))
    start = max(0, target - spares - coming)
    requested_at = now if start else state.requested_at
    return start, WarmState(coming=coming + start, requested_at=requested_at, seen=plain)


def _generated(module: str) -> Any:
    """One of Ray's generated protobuf modules (Ray ships no type stubs for them)."""
    return importlib.import_module(f"ray.core.generated.{module}")


class RayletClient:
    """The two raylet RPCs the keeper needs, over gRPC with the cluster's token."""

    def __init__(self, address: str, token_path: Path) -> None:
        import grpc

        self._address = address
        self._token_path = token_path
        # gRPC's reconnect backoff grows to 120 s by default: the raylet would be found late.
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", int(STARTUP_POLL_S * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(STARTUP_POLL_S * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(POLL_S * 1000)),
            ],
        )
        self._stub = _generated("node_manager_pb2_grpc").NodeManagerServiceStub(self._channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token_path.read_text().strip()
        return (("authorization", f"Bearer {token}"),)

    def workers(self) -> list[WorkerInfo]:
        """The node's registered workers (drivers and I/O workers included)."""
        common_pb2, node_manager_pb2 = _generated("common_pb2"), _generated("node_manager_pb2")
        reply = self._stub.GetNodeStats(
            node_manager_pb2.GetNodeStatsRequest(include_memory_info=False),
            timeout=RPC_TIMEOUT_S,
            metadata=self._metadata(),
        )
        return [
            WorkerInfo(
                pid=w.pid,
                is_plain_worker=w.worker_type == common_pb2.WORKER,
                job_id=w.job_id,
                actor_id=w.actor_id,
            )
            for w in reply.core_workers_stats
        ]

    def prestart(self, count: int) -> None:
        """Asks the raylet to start ``count`` Python workers with no job and no runtime env."""
        common_pb2, node_manager_pb2 = _generated("common_pb2"), _generated("node_manager_pb2")
        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON, keep_alive_duration_secs=KEEP_ALIVE_S, num_workers=count
        )
        request.runtime_env_info.serialized_runtime_env = "{}"
        self._stub.PrestartWorkers(request, timeout=RPC_TIMEOUT_S, metadata=self._metadata())

    def close(self) -> None:
        self._channel.close()


class Raylet(Protocol):
    """What the keeper needs of a raylet; ``RayletClient`` is the real one. Each call is bounded
    by ``RPC_TIMEOUT_S`` and raises on failure."""

    def workers(self) -> list[WorkerInfo]: ...

    def prestart(self, count: int) -> None: ...

    def close(self) -> None: ...


class WarmWorkerKeeper:
    """A thread that keeps ``target`` spare workers on one node; see the module docstring.

    The raylet client is built on the keeper's thread (``connect``), so importing gRPC and Ray's
    generated modules neither delays the node agent nor can fail it: the keeper's own failures
    leave the node without spares, logged, and nothing else.
    """

    def __init__(
        self,
        connect: Callable[[], Raylet],
        target: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._raylet: Raylet | None = None
        self._target = target
        self._clock = clock
        self._state = WarmState()
        self._stop = threading.Event()
        self._problem: str | None = None
        self._reached = False
        self._thread = threading.Thread(target=self._run, name="warm-workers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread (the client is closed there, never under a call in flight)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(RPC_TIMEOUT_S * 2 + POLL_S)

    def step(self) -> int:
        """One round: asks the raylet for its workers and prestarts what is missing."""
        if self._raylet is None:
            self._raylet = self._connect()
        start, self._state = decide(
            self._target, self._raylet.workers(), self._state, self._clock()
        )
        if start:
            self._raylet.prestart(start)
            logger.info("prestarting %d spare Ray worker(s) for the next replica", start)
        return start

    def round(self) -> bool:
        """``step``, with its failures logged once per kind; True when the raylet answered."""
        try:
            self.step()
        except Exception as e:  # noqa: BLE001 - the keeper must never die; see the class doc
            # Until the raylet is up (and while it stops) it refuses connections: expected, so
            # not logged. Anything else is logged when it first appears, not every round.
            code = getattr(e, "code", None)
            problem = f"{type(e).__name__}: {code() if callable(code) else e}"
            if problem != self._problem and "UNAVAILABLE" not in problem:
                logger.warning("spare workers: %s (the node runs on without them)", problem)
            self._problem = problem
            return False
        if not self._reached or self._problem is not None:
            logger.info("spare workers: keeping %d on this node", self._target)
        self._problem = None
        self._reached = True
        return True

    def _run(self) -> None:
        try:
            while not self._stop.wait(POLL_S if self._reached else STARTUP_POLL_S):
                self.round()
        finally:
            if self._raylet is not None:
                self._raylet.close()
