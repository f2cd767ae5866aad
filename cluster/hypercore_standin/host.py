"""The stand-in's host: Hypercore's agent semantics over local workload processes.

What a real host does, and so what this does (Hypercore's pkg/cluster/serf.go):
- Spawn checks every port (a port above 65535 makes the host ignore the request, which the
  caller sees as "no response received from nodes"), honours ``dry_run`` with an empty success,
  refuses when running cores plus the request exceed ``max(host CPUs, 225)``, "pulls" the image
  (here: looks it up in the catalog) and returns once the entrypoint runs. Memory is not checked
  (Hypercore only logs a warning) and neither cores nor memory are enforced on the process.
- Stop ends the workload (SIGTERM, 5 s, SIGKILL) and removes it; an unknown id fails with
  "no success response received from nodes" (at once here; a real cluster waits out its query).
- Every refresh interval the host rebuilds its cached state, which List returns: its name (a
  UUID new at each start), its running workloads with the request each was spawned from, and the
  beacon. ``node.ip`` carries the state-broadcast batch marker (``<uuid>_complete``, or
  ``_finish`` past 10 workloads) on a refresh whose set of workloads changed, and is empty
  otherwise. Before the first refresh the host's entry is empty.
- On a refresh, a workload whose process has exited is removed and spawned again from its
  stored request under a new id (its old log stays readable).

Addresses: each workload gets its own 127.0.0.0/8 address from ``WORKLOAD_NETWORK`` (Hypercore
gives each a 10.88.0.0/16 address in its own network namespace). Every 127/8 address reaches the
loopback interface on Linux without configuration, so this needs no root and leaves no kernel
state (veths, namespaces, routes) to clean up after a crash; the Ray head on 127.0.0.1 stays
reachable from every workload, and Ray nodes on distinct loopback addresses form a real
multi-node cluster. The cost: nothing stops a workload from binding another's address, and
loopback addresses are not reachable from other machines (neither is 10.88/16 on a real host).

Mapped ports are checked but not proxied: Hypercore's proxy is an HTTP reverse proxy routed by
the ``Host: <id>.<base url>`` header on each mapped host port, which Hyperfleet does not use
(Ray reaches nodes on their own addresses).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.hypercore import errors, gojson, proto
from cluster.hypercore.client import SPAWN_TIMEOUT_S
from cluster.hypercore.models import MAX_PORT

from .catalog import ImageCatalog
from .workload import WorkloadProcess, read_tail, workload_env

logger = logging.getLogger(__name__)

MIN_CAPACITY_CORES = 225  # Hypercore: max(runtime.NumCPU(), 225)
STOP_GRACE_S = 5.0  # containerd task kill: SIGTERM, 5 s, SIGKILL
MAX_WORKLOADS = 64
TMP_DIR_PREFIX = "hcw-"  # a workload's TMPDIR: <workload_tmp_root()>/hcw-<its id's first 13 chars>
MAX_TMP_ROOT_CHARS = 18
MAX_RETAINED_LOGS = 256
STATE_BATCH_SIZE = 10  # workloads per state-broadcast part
WORKLOAD_NETWORK = ipaddress.IPv4Network("127.88.0.0/16")
BEACON_CAPABILITIES = ("container", "vm")
BEACON_PRICE_PER_GB = 0.01
BEACON_REPUTATION = "1.0"


class HostError(Exception):
    """A refusal, carrying the exact text Hypercore would send."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def workload_tmp_root() -> Path:
    """Where workloads' TMPDIRs go: the host's temp dir when it is short enough for the Unix
    socket paths Ray makes below a workload's TMPDIR (at most 107 bytes, of which
    ``hcw-<13>/ray/session_<date>_<time>_<pid>/sockets/plasma_store.<n>`` takes up to 89), else
    /tmp."""
    root = tempfile.gettempdir()
    return Path(root if len(root) <= MAX_TMP_ROOT_CHARS else "/tmp")  # noqa: S108


def workload_tmp_dir(workload_id: str, root: Path | None = None) -> Path:
    """A workload's own TMPDIR, under ``root`` (default: ``workload_tmp_root()``)."""
    return (root or workload_tmp_root()) / f"{TMP_DIR_PREFIX}{workload_id[:13]}"


class AddressPool:
    """Hands out the host addresses of ``WORKLOAD_NETWORK`` round-robin, so a freed address is
    not reused while something may still hold a connection to it.

    Each stand-in starts at a random place in the range: two stand-ins on one machine (two test
    sessions, say) then rarely hand out the same address.
    """

    def __init__(
        self, network: ipaddress.IPv4Network = WORKLOAD_NETWORK, start: int | None = None
    ) -> None:
        # .0.1 is left out: 127.88.0.1 reads like a gateway, and no workload should look like one.
        self._addresses = [str(a) for a in network.hosts()][1:]
        self._next = secrets.randbelow(len(self._addresses)) if start is None else start
        self._used: set[str] = set()

    def allocate(self) -> str:
        for _ in range(len(self._addresses)):
            address = self._addresses[self._next]
            self._next = (self._next + 1) % len(self._addresses)
            if address not in self._used:
                self._used.add(address)
                return address
        raise HostError(errors.NODE_FAILURE_PREFIX + errors.CAPACITY_PREFIX + "no address left")

    def release(self, address: str) -> None:
        self._used.discard(address)


@dataclass
class _Entry:
    id: str
    request: Any  # VmSpawnRequest, dry_run cleared: what List echoes and a respawn reuses
    address: str
    process: WorkloadProcess
    tmp: Path  # its own TMPDIR, removed with it
    stopping: bool = False


class Host:
    """One Hypercore host. All methods run on one asyncio loop."""

    def __init__(
        self,
        catalog: ImageCatalog,
        state_dir: Path,
        base_url: str,
        *,
        cpu_count: int | None = None,
        python: str = sys.executable,
    ) -> None:
        self.name = str(uuid.uuid4())
        self._catalog = catalog
        self._logs_dir = state_dir / "logs"
        self._homes_dir = state_dir / "workloads"
        self._logs_dir.mkdir(parents=True, exist_ok=True)
        self._homes_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_root = workload_tmp_root()
        self._base_url = base_url
        self._cpu_count = cpu_count or os.cpu_count() or 1
        self._python = python
        self._workloads: dict[str, _Entry] = {}
        self._addresses = AddressPool()
        self._spawn_lock = asyncio.Lock()
        self._cached: Any | None = None  # NodeStateResponse; None before the first refresh
        self._last_hash = ""
        self._beacon_key = os.urandom(32)  # Hypercore's beacon publishes an ed25519 public key
        self._retained_logs: deque[str] = deque()
        self._respawns: set[asyncio.Task[None]] = set()
        self._closing = False

    async def spawn(self, request: Any) -> Any:
        """Spawn: returns a ``VmSpawnResponse`` once the workload runs.

        Raises:
            HostError: with Hypercore's text for a bad port, no capacity or an unknown image.
        """
        for host_port, workload_port in request.ports.items():
            if host_port > MAX_PORT or workload_port > MAX_PORT:
                raise HostError(errors.NO_RESPONSE)
        if request.dry_run:
            return proto.VmSpawnResponse()
        if self._closing:
            raise HostError(errors.NO_RESPONSE)
        stored = proto.VmSpawnRequest()
        stored.CopyFrom(request)
        stored.dry_run = False
        async with self._spawn_lock:
            try:
                entry = await asyncio.wait_for(self._start(stored), SPAWN_TIMEOUT_S)
            except TimeoutError as e:
                # Hypercore's spawn query times out with no answer from the host.
                raise HostError(errors.NO_RESPONSE) from e
            if self._closing:
                # shutdown() began while this one started: it would never see the workload.
                await entry.process.terminate(STOP_GRACE_S)
                self._remove(entry)
                raise HostError(errors.NO_RESPONSE)
            self._workloads[entry.id] = entry
        logger.info("spawned %s (%s) at %s", entry.id, request.image_ref, entry.address)
        return proto.VmSpawnResponse(id=entry.id, url=f"{entry.id}.{self._base_url}")

    def _refuse(self, text: str) -> HostError:
        return HostError(errors.NODE_FAILURE_PREFIX + text)

    async def _start(self, request: Any) -> _Entry:
        used = sum(e.request.cores for e in self._workloads.values())
        if used + request.cores > max(self._cpu_count, MIN_CAPACITY_CORES):
            raise self._refuse(
                errors.CAPACITY.format(cpus=self._cpu_count, used=used, requested=request.cores)
            )
        if len(self._workloads) >= MAX_WORKLOADS:
            raise self._refuse(errors.CAPACITY_PREFIX + f"at most {MAX_WORKLOADS} workloads")
        image = self._catalog.get(request.image_ref)
        if image is None:
            ref = request.image_ref
            reason = f'failed to resolve reference "{ref}": {ref}: not found'
            raise self._refuse(errors.PULL_FAILED.format(ref=ref, reason=reason))
        workload_id = str(uuid.uuid4())
        address = self._addresses.allocate()
        home = self._homes_dir / workload_id
        tmp = workload_tmp_dir(workload_id, self._tmp_root)
        argv, image_env = image.render(workload_ip=address, python=self._python)
        env = workload_env(image_env, list(request.env), home, tmp)
        made: list[Path] = []
        try:
            for directory, mode in ((home, 0o777), (tmp, 0o700)):
                directory.mkdir(mode=mode)  # fails if it exists: then it is not this one's
                made.append(directory)
            process = await WorkloadProcess.start(argv, env, home, self._logs_dir / workload_id)
        except OSError as e:
            self._addresses.release(address)
            for directory in made:
                shutil.rmtree(directory, ignore_errors=True)
            raise self._refuse(
                errors.START_FAILED.format(id=workload_id, reason=e.strerror or str(e))
            ) from e
        return _Entry(workload_id, request, address, process, tmp)

    async def stop(self, workload_id: str) -> Any:
        """Stop: ends the workload and returns the host's ``Node``.

        Raises:
            HostError: "no success response received from nodes" for an unknown id.
        """
        entry = self._workloads.get(workload_id)
        if entry is None or entry.stopping:
            raise HostError(errors.NO_SUCCESS_RESPONSE)
        entry.stopping = True
        await entry.process.terminate(STOP_GRACE_S)
        self._remove(entry)
        logger.info("stopped %s", workload_id)
        return proto.Node(id=self.name)

    def _remove(self, entry: _Entry) -> None:
        self._workloads.pop(entry.id, None)
        self._addresses.release(entry.address)
        shutil.rmtree(self._homes_dir / entry.id, ignore_errors=True)
        shutil.rmtree(entry.tmp, ignore_errors=True)
        self._retained_logs.append(entry.id)
        while len(self._retained_logs) > MAX_RETAINED_LOGS:
            (self._logs_dir / self._retained_logs.popleft()).unlink(missing_ok=True)

    async def refresh(self) -> None:
        """Rebuilds the cached state List returns, and respawns workloads that exited."""
        for entry in list(self._workloads.values()):
            if entry.process.exited and not entry.stopping:
                logger.info("workload %s exited: respawning it under a new id", entry.id)
                # Claimed before the await: a Stop meanwhile must not succeed on a workload
                # that is about to come back under a new id.
                entry.stopping = True
                await entry.process.terminate(0.0)  # the rest of its tree goes with it
                self._remove(entry)
                task = asyncio.create_task(self._respawn(entry.request))
                self._respawns.add(task)
                task.add_done_callback(self._respawns.discard)
        running = [e for e in self._workloads.values() if not e.process.exited]
        for entry in running:
            await entry.process.snapshot_tree()
        state = proto.NodeStateResponse()
        state.node.id = self.name
        for entry in running:
            state.workloads.add(id=entry.id, source_request=entry.request)
        ids = ",".join(sorted(e.id for e in running))
        digest = hashlib.sha256(f"{len(running)}:{ids}".encode()).hexdigest()
        if digest != self._last_hash:
            self._last_hash = digest
            if running:
                parts = math.ceil(len(running) / STATE_BATCH_SIZE)
                state.node.ip = f"{uuid.uuid4()}_{'complete' if parts == 1 else 'finish'}"
        state.beacon.CopyFrom(self._beacon())
        self._cached = state

    def _beacon(self) -> Any:
        return proto.BeaconMetadata(
            beacon_node_id=self._beacon_key[:8].hex(),
            node_signature=self._beacon_key,
            timestamp=int(time.time()),
            reputation_score=BEACON_REPUTATION,
            node_capabilities=list(BEACON_CAPABILITIES),
            price_per_gb=BEACON_PRICE_PER_GB,
        )

    async def _respawn(self, request: Any) -> None:
        try:
            response = await self.spawn(request)
        except (HostError, OSError) as e:
            logger.warning("respawn of %s failed: %s", request.image_ref, e)
            return
        logger.info("respawned as %s", response.id)

    def cached_state(self) -> Any | None:
        """The host's entry for List as of the last refresh; None before the first one."""
        return self._cached

    def logs_via_cluster(self, workload_id: str) -> str:
        """gRPC Logs: Hypercore finds the workload in its cached state, then returns the body of
        the host's HTTP ``/logs`` answer as is (JSON, not the bare logs).

        Raises:
            HostError: "workload <id> does not exist" when the cached state lacks it.
        """
        cached = self._cached.workloads if self._cached is not None else []
        if not any(w.id == workload_id for w in cached):
            raise HostError(errors.LOGS_UNKNOWN.format(id=workload_id))
        try:
            body: dict[str, str] = {"response": self.logs_file(workload_id)}
        except HostError as e:
            body = {"error": e.text}
        return gojson.dumps(body).decode()

    def logs_file(self, workload_id: str) -> str:
        """HTTP ``/logs``: the workload's log file (its last ``LOG_TAIL_BYTES``), also after it
        stopped.

        Raises:
            HostError: "open <path>: no such file or directory" for an unknown id.
        """
        path = self._logs_dir / workload_id
        try:
            uuid.UUID(workload_id)  # Hypercore reads any path it is given; this reads only ids
            return read_tail(path).decode("utf-8", errors="replace")
        except (ValueError, FileNotFoundError) as e:
            raise HostError(errors.LOGS_NO_FILE.format(path=path)) from e

    async def shutdown(self) -> None:
        """Stops every workload (SIGTERM, 5 s, SIGKILL), all at once, after any Spawn in flight
        (which, seeing the host closing, stops the workload it started and fails)."""
        self._closing = True
        # Not cancelled: a respawn cancelled inside its start could leave its process behind.
        await asyncio.gather(*list(self._respawns), return_exceptions=True)
        async with self._spawn_lock:
            entries = list(self._workloads.values())
        await asyncio.gather(*(e.process.terminate(STOP_GRACE_S) for e in entries))
        for entry in entries:
            self._remove(entry)
