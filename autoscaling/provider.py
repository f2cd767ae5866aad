"""``HypercoreNodeProvider``: Ray's autoscaler adds and removes nodes as Hypercore workloads.

Loaded by Ray through ``provider: {type: external, module: autoscaling.provider.
HypercoreNodeProvider}`` (``ray/autoscaler/_private/providers.py``, ``_import_external``) and
constructed as ``HypercoreNodeProvider(provider_config, cluster_name)``. Autoscaler v2 wraps it in
``NodeProviderAdapter`` and calls it from several threads at once.

Design decisions:

- Nothing that matters lives in process memory. Ray builds a provider on the operator's machine
  (``ray up``/``ray down``) and another inside the head's autoscaler, and restarts them at will.
  The node id given to Ray is the provider's own (``hf-<cluster>-<hex>``), carried with the
  creation tags and the cluster name in the workload's env (``node_env``) and read back through
  Hypercore's List on every refresh. A workload Hypercore respawns from its stored request (under
  a new workload id) is therefore still the same node, with the same tags.
- What List cannot carry lives in ``ProviderState`` (SQLite): tags Ray sets after creation, and
  tombstones of terminated nodes. In memory there are only caches that a fresh instance rebuilds:
  List (for ``list_cache_ttl_s``), workloads Spawned a moment ago that List (refreshed by Hypercore
  every ~5 s) does not show yet, and workloads Stopped a moment ago that it still shows.
- Terminate is idempotent: the node is tombstoned first, then its workloads Stopped in parallel,
  an unknown workload meaning "already gone"; then List is watched for a while (Hypercore may
  respawn a workload that exited just before the Stop, under a new id) and anything carrying a
  terminated id is Stopped too. A workload that still carries a tombstoned node id and shows up
  later (or whose Stop failed) is Stopped in the background when a read next sees it: reads never
  wait for a Stop nor raise its error.
- A launch that Hypercore refuses part of Stops the nodes that did start before it raises.
- Hypercore errors are raised, never swallowed: under v2 a failed launch becomes a
  ``LaunchNodeError`` and the autoscaler asks again on a later tick.
- Secrets: a worker's env carries a one-time join ticket (``cluster.join.TicketBook``, minted in
  the head's ``HYPERFLEET_JOIN_DB``) that the head redeems for the Ray token; never the token.
- ``ray up``'s head gets the whole autoscaler config in its env (``bootstrap_config`` keeps a copy
  for it): Hypercore can put no file into a workload, and the runner runs nothing remotely
  (``command_runner``).
- Addresses come from Ray's node table by instance id (``ray_nodes``), else from the address
  ``ray start`` logged in the workload's log, else None: List has no workload address.
- Metrics (``provider_metrics``): every Hypercore call is counted and timed beneath the client,
  ``hyperfleet_vms`` is set from each List, and the provider in the head's autoscaler (the one
  process that sees ``HYPERFLEET_HEAD_ADDRESS``) serves them on ``metrics_port``, once per
  process however many instances Ray builds. ``ray up`` on an operator's machine serves nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    TAG_RAY_NODE_KIND,
    TAG_RAY_USER_NODE_TYPE,
)

from cluster.hypercore import (
    GrpcTransport,
    HttpTransport,
    HypercoreClient,
    HypercoreError,
    SpawnRequest,
    Transport,
    UnknownWorkload,
)
from cluster.join.tickets import TicketBook
from hyperfleet import logs
from hyperfleet.errors import HyperfleetError

from . import node_env as env_keys
from . import provider_metrics
from .command_runner import HypercoreCommandRunner
from .node_env import ListedNode, NodeSpec, listed_node, new_node_id, node_env
from .provider_config import NodeConfig, ProviderConfig, ProviderConfigError, ray_memory_bytes
from .provider_state import ProviderState
from .ray_nodes import RayNodeTable

logger = logging.getLogger(__name__)

# Where ``bootstrap_config`` leaves the cluster config for the head's env (Ray ignores ``_`` keys
# of the provider section; ``prepare_for_head_node`` removes it from the head's own copy).
HEAD_CONFIG_KEY = "_hyperfleet_head_config"
# A Spawned workload shows in List after Hypercore's next refresh (~5 s); a Stopped one may show
# until then. Beyond this, List is believed.
LIST_LAG_S = 30.0
MAX_PARALLEL_SPAWNS = 8
MAX_PARALLEL_STOPS = 8
# A Stop ends the workload with SIGTERM, 5 s, SIGKILL; the rest is margin for Hypercore's query.
STOP_TIMEOUT_S = 30.0
# After terminating, List is watched for this many of Hypercore's refresh intervals (a respawn
# from a stale entry shows one refresh after the one that started it), and must stay clear of
# the terminated ids for one whole interval.
SETTLE_REFRESHES = 2
SETTLE_POLL_S = 0.5
# `ray start` prints the address it advertises (ray/scripts/scripts.py, "Local node IP").
_NODE_IP_LINE = re.compile(r"Local node IP:\s*(\S+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Tag updates of nodes gone from List are dropped after this (longer than LIST_LAG_S).
FORGET_TAGS_AFTER_S = 300.0


class NodeLaunchError(HyperfleetError):
    """Hypercore refused or failed a Spawn; ``retryable`` when Hypercore was unreachable."""

    status_code = 503
    error_type = "node_launch_failed"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class _Spawned:
    node: ListedNode
    at: float


class HypercoreNodeProvider(NodeProvider):
    """A Ray ``NodeProvider`` whose nodes are Hypercore workloads (see the module docstring)."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        # JSON lines for this package only: Ray's monitor keeps its own log as it is.
        logs.configure("provider", logger="autoscaling")
        self.config = ProviderConfig.parse(provider_config)
        transport: Transport = (
            GrpcTransport(self.config.hypercore_address)
            if self.config.transport == "grpc"
            else HttpTransport(self.config.hypercore_address)
        )
        self._client = HypercoreClient(
            provider_metrics.MeteredTransport(transport), timeout_s=self.config.call_timeout_s
        )
        self._state = ProviderState(self.config.resolved_state_dir(), cluster_name)
        self._ray_nodes = RayNodeTable(os.environ.get(env_keys.HEAD_ADDRESS))
        self._head_config: dict[str, Any] | None = provider_config.get(HEAD_CONFIG_KEY)
        self._lock = threading.Lock()  # guards the caches below
        self._refresh_lock = threading.Lock()  # one List call at a time; others reuse its result
        self._listed: dict[str, list[ListedNode]] = {}
        self._listed_at = float("-inf")
        self._spawned: dict[str, _Spawned] = {}  # node id -> not in List yet
        self._stopped: dict[str, float] = {}  # workload id -> when this instance stopped it
        self._stopping: dict[str, Future[bool]] = {}  # workload id -> its Stop in flight
        self._stop_pool = ThreadPoolExecutor(MAX_PARALLEL_STOPS, thread_name_prefix="hf-stop")
        self._log_addresses: dict[str, str] = {}  # workload id -> address its log reported
        self._tickets: TicketBook | None = None  # opened on first use: only the head has one
        metrics_host = provider_metrics.metrics_host(os.environ.get(env_keys.HEAD_ADDRESS))
        if self.config.metrics_port and metrics_host:
            provider_metrics.serve(metrics_host, self.config.metrics_port)

    # ---- reading state -------------------------------------------------------------------

    def _refresh(self, force: bool = False) -> None:
        with self._refresh_lock:
            if not force and time.monotonic() - self._listed_at < self.config.list_cache_ttl_s:
                return
            states = self._client.list()
            listed: dict[str, list[ListedNode]] = {}
            for host in states:
                for workload in host.workloads:
                    node = listed_node(workload.id, workload.request.env, self.cluster_name)
                    if node is not None:
                        listed.setdefault(node.node_id, []).append(node)
            buried = self._state.buried()
            now = time.monotonic()
            with self._lock:
                self._listed = listed
                self._listed_at = now
                for node_id in [n for n in self._spawned if n in listed]:
                    del self._spawned[node_id]
                for node_id, spawned in list(self._spawned.items()):
                    if now - spawned.at > LIST_LAG_S:
                        del self._spawned[node_id]
                for workload_id, at in list(self._stopped.items()):
                    if now - at > LIST_LAG_S:
                        del self._stopped[workload_id]
                strays = [
                    n.workload_id
                    for node_id in buried
                    for n in listed.get(node_id, [])
                    if n.workload_id not in self._stopped
                ]
        for workload_id in strays:
            logger.info("stopping workload %s of a terminated node", workload_id)
            self._stop_async(workload_id).add_done_callback(_log_stop_failure)
        if buried:
            self._state.note_listed(listed)
        self._state.forget_tags(keep=listed, older_than_s=FORGET_TAGS_AFTER_S)
        self._report_vms(buried)

    def _report_vms(self, buried: set[str]) -> None:
        """Sets ``hyperfleet_vms`` from this instance's view: each workload of the cluster in
        List (running) and each Spawned one that List does not show yet (spawned), either of
        them stopping once Stopped or its node terminated."""
        counts: Counter[tuple[str, str]] = Counter()
        with self._lock:
            for node_id, workloads in self._listed.items():
                for node in workloads:
                    stopping = node_id in buried or node.workload_id in self._stopped
                    state = (
                        provider_metrics.VM_STOPPING if stopping else provider_metrics.VM_RUNNING
                    )
                    counts[(_node_type(node), state)] += 1
            for node_id, spawned in self._spawned.items():
                stopping = node_id in buried or spawned.node.workload_id in self._stopped
                state = provider_metrics.VM_STOPPING if stopping else provider_metrics.VM_SPAWNED
                counts[(_node_type(spawned.node), state)] += 1
        provider_metrics.report_vms(counts)

    def _nodes(self) -> dict[str, ListedNode]:
        """Live nodes by id from the cached List, with recent Spawns and without recent Stops."""
        buried = self._state.buried()
        with self._lock:
            nodes: dict[str, ListedNode] = {}
            for node_id, workloads in self._listed.items():
                live = [w for w in workloads if w.workload_id not in self._stopped]
                if live and node_id not in buried:
                    nodes[node_id] = live[0]
            for node_id, spawned in self._spawned.items():
                if node_id not in buried:
                    nodes.setdefault(node_id, spawned.node)
            return nodes

    def _workload_ids(self, node_id: str) -> list[str]:
        """The node's workloads, without those already stopped: a Stop of an unknown id costs a
        real Hypercore its whole cluster query timeout."""
        with self._lock:
            ids = [w.workload_id for w in self._listed.get(node_id, [])]
            if node_id in self._spawned:
                ids.append(self._spawned[node_id].node.workload_id)
            return sorted(set(ids) - self._stopped.keys())

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        self._refresh()
        updates = self._state.tag_updates()
        return sorted(
            node_id
            for node_id, node in self._nodes().items()
            if _matches({**node.tags, **updates.get(node_id, {})}, tag_filters)
        )

    def is_running(self, node_id: str, refresh: bool = False) -> bool:
        self._refresh(force=refresh)
        return node_id in self._nodes()

    def is_terminated(self, node_id: str) -> bool:
        return not self.is_running(node_id)

    def node_tags(self, node_id: str) -> dict[str, str]:
        node = self._nodes().get(node_id)
        if node is None:
            self._refresh()
            node = self._nodes().get(node_id)
        base = dict(node.tags) if node is not None else {}
        return {**base, **self._state.tag_updates().get(node_id, {})}

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        self._state.update_tags(node_id, dict(tags))

    # None until the node's Ray has started (Ray's annotation says str; its launcher treats a
    # falsy address as "not known yet", and autoscaler v2 reads addresses from the GCS itself).
    def internal_ip(self, node_id: str) -> str | None:  # type: ignore[override]
        """The node's address from Ray's node table; where the GCS is out of reach (``ray up``,
        ``ray get-head-ip`` on the operator's machine), from ``ray start``'s own log line."""
        return self._ray_nodes.address_of(node_id) or self._address_from_logs(node_id)

    def external_ip(self, node_id: str) -> str | None:  # type: ignore[override]
        # Workloads are reachable only inside their host's 10.88.0.0/16: there is no other address.
        return self.internal_ip(node_id)

    def _address_from_logs(self, node_id: str) -> str | None:
        for workload_id in self._workload_ids(node_id):
            with self._lock:
                known = self._log_addresses.get(workload_id)
            if known:
                return known
            try:
                logs = _ANSI.sub("", self._client.logs(workload_id))
            except UnknownWorkload:
                continue
            if match := _NODE_IP_LINE.search(logs):
                with self._lock:
                    self._log_addresses[workload_id] = match.group(1)
                return match.group(1)
        return None

    def node_logs(self, node_id: str) -> str:
        """The logs of the node's current workload(s); "" when it has none."""
        parts: list[str] = []
        for workload_id in self._workload_ids(node_id):
            try:
                parts.append(self._client.logs(workload_id))
            except UnknownWorkload:
                continue
        return "\n".join(parts)

    # ---- creating nodes ------------------------------------------------------------------

    def create_node(
        self, node_config: dict[str, Any], tags: dict[str, str], count: int
    ) -> dict[str, Any]:
        """Creates nodes without explicit resources: ``ray up``'s head, whose resources and
        labels come from its node type in the cluster config."""
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE, "")
        types = (self._head_config or {}).get("available_node_types", {})
        declared = types.get(node_type, {})
        return self.create_node_with_resources_and_labels(
            node_config,
            tags,
            count,
            dict(declared.get("resources") or {}),
            dict(declared.get("labels") or {}),
        )

    def create_node_with_resources_and_labels(
        self,
        node_config: dict[str, Any],
        tags: dict[str, str],
        count: int,
        resources: dict[str, float],
        labels: dict[str, str],
    ) -> dict[str, Any]:
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE, "")
        parsed = NodeConfig.parse(node_config, node_type)
        with ThreadPoolExecutor(max_workers=max(1, min(count, MAX_PARALLEL_SPAWNS))) as pool:
            futures = [
                pool.submit(self._spawn_one, parsed, tags, resources, labels) for _ in range(count)
            ]
        created: dict[str, Any] = {}
        errors: list[HypercoreError] = []
        for future in futures:
            try:
                node = future.result()
            except HypercoreError as e:
                errors.append(e)
            else:
                created[node.node_id] = {"workload_id": node.workload_id}
        self._report_vms(self._state.buried())
        if errors:
            if created:
                # Ray counts the whole launch as failed and never learns these ids: stop them.
                try:
                    self.terminate_nodes(sorted(created))
                except (HypercoreError, TimeoutError) as e:
                    logger.warning("cannot stop the nodes of a failed launch: %s", e)
            retryable = all(getattr(e, "retryable", False) for e in errors)
            raise NodeLaunchError(
                f"Hypercore launched {len(created)} of {count} {node_type!r} nodes: {errors[0]}",
                retryable=retryable,
            ) from errors[0]
        return created

    def _spawn_one(
        self,
        node_config: NodeConfig,
        tags: Mapping[str, str],
        resources: Mapping[str, float],
        labels: Mapping[str, str],
    ) -> ListedNode:
        node_id = new_node_id(self.cluster_name)
        is_head = tags.get(TAG_RAY_NODE_KIND) == NODE_KIND_HEAD
        spec = NodeSpec(
            node_id=node_id,
            cluster_name=self.cluster_name,
            role="head" if is_head else "worker",
            node_type=tags.get(TAG_RAY_USER_NODE_TYPE, ""),
            tags=dict(tags),
            resources=dict(resources),
            labels=dict(labels),
            memory_mb=node_config.memory_mb,
            **(self._head_fields() if is_head else self._worker_fields(node_id)),
        )
        request = SpawnRequest(
            cores=node_config.cores,
            memory_mb=node_config.memory_mb,
            image_ref=node_config.image or self.config.default_image,
            ports=dict(node_config.ports),
            env=node_env(spec),
            dry_run=False,
        )
        try:
            spawned = self._client.spawn(request, timeout_s=self.config.spawn_timeout_s)
        except HypercoreError:
            # A timed-out Spawn may still have started the workload: count the node as failed,
            # so that its ticket is void and the workload is stopped if it ever shows in List.
            self._state.bury(node_id)
            self._revoke(node_id)
            raise
        node = ListedNode(node_id=node_id, workload_id=spawned.id, tags=dict(tags))
        with self._lock:
            self._spawned[node_id] = _Spawned(node, time.monotonic())
        logger.info("spawned node %s as Hypercore workload %s", node_id, spawned.id)
        return node

    def _head_fields(self) -> dict[str, Any]:
        if self._head_config is None:
            logger.warning("creating a head without an autoscaler config: only `ray up` passes one")
        return {"ray_port": self.config.head_ray_port, "autoscaling_config": self._head_config}

    def _worker_fields(self, node_id: str) -> dict[str, Any]:
        head_address = os.environ.get(env_keys.HEAD_ADDRESS)
        join_url = os.environ.get(env_keys.JOIN_URL)
        join_db = os.environ.get(env_keys.JOIN_DB)
        if not (head_address and join_url and join_db):
            # Outside a head's autoscaler there is no cluster to join: such a worker would only
            # crash-loop (and Hypercore respawn it), so nothing is spawned.
            raise NodeLaunchError(
                f"cannot launch worker {node_id}: {env_keys.HEAD_ADDRESS}, {env_keys.JOIN_URL} "
                f"and {env_keys.JOIN_DB} must be set in the provider's environment (the head's "
                "node agent sets them for its autoscaler)",
                retryable=False,
            )
        ticket = self._ticket_book(join_db).mint(node_id, ttl_s=self.config.ticket_ttl_s)
        return {"head_address": head_address, "join_url": join_url, "join_ticket": ticket}

    # ---- terminating nodes ---------------------------------------------------------------

    def terminate_node(self, node_id: str) -> dict[str, Any]:
        return self.terminate_nodes([node_id])

    def terminate_nodes(self, node_ids: list[str]) -> dict[str, Any]:
        """Tombstones the nodes, Stops their workloads in parallel, then watches List for
        ``SETTLE_REFRESHES`` Hypercore refresh intervals, Stopping any workload that still
        carries one of their ids (one Hypercore respawned just before the Stop).

        Raises:
            HypercoreError: a Stop still failing at the end (the node stays tombstoned, and a
                later read Stops its workload in the background).
        """
        if not node_ids:
            return {}
        for node_id in node_ids:
            self._state.bury(node_id)
            self._revoke(node_id)
        stopped: dict[str, list[str]] = {node_id: [] for node_id in node_ids}
        interval_s = self.config.hypercore_refresh_interval_s
        deadline = time.monotonic() + SETTLE_REFRESHES * interval_s
        clear_since = time.monotonic()
        while True:
            self._refresh(force=True)
            futures = {
                (node_id, w): self._stop_async(w)
                for node_id in node_ids
                for w in self._all_workload_ids(node_id)
            }
            wait_futures(futures.values(), timeout=STOP_TIMEOUT_S + SETTLE_POLL_S)
            errors: list[BaseException] = []
            for (node_id, workload_id), future in futures.items():
                error = future.exception(timeout=0) if future.done() else None
                if not future.done() or error is not None:
                    errors.append(error or TimeoutError(f"Stop of {workload_id} still running"))
                elif future.result():
                    stopped[node_id].append(workload_id)
                else:
                    continue
                clear_since = time.monotonic()
            now = time.monotonic()
            if not errors and now - clear_since > interval_s:
                break
            if now >= deadline:
                if errors:
                    raise errors[0]
                break
            time.sleep(SETTLE_POLL_S)
        for node_id, workloads in stopped.items():
            logger.info("terminated node %s (workloads stopped: %s)", node_id, workloads or "none")
        return {node_id: {"workload_ids": workloads} for node_id, workloads in stopped.items()}

    def _all_workload_ids(self, node_id: str) -> list[str]:
        """The node's workloads in the cached List or Spawned a moment ago, stopped or not."""
        with self._lock:
            ids = {w.workload_id for w in self._listed.get(node_id, [])}
            if node_id in self._spawned:
                ids.add(self._spawned[node_id].node.workload_id)
            return sorted(ids)

    def _stop_async(self, workload_id: str) -> Future[bool]:
        """Stops one workload on the Stop pool; the future says False if it was already gone.

        At most one Stop per workload id: a second caller gets the Stop in flight, or False once
        it succeeded (a Stop of an unknown id costs a real Hypercore its whole query timeout)."""
        with self._lock:
            running = self._stopping.get(workload_id)
            if running is not None:
                return running
            if workload_id in self._stopped:
                done: Future[bool] = Future()
                done.set_result(False)
                return done
            self._stopped[workload_id] = time.monotonic()
            future = self._stop_pool.submit(self._stop_workload, workload_id)
            self._stopping[workload_id] = future
            return future

    def _stop_workload(self, workload_id: str) -> bool:
        try:
            self._client.stop(workload_id, timeout_s=STOP_TIMEOUT_S)
        except UnknownWorkload:
            return False
        except BaseException:
            with self._lock:
                self._stopped.pop(workload_id, None)  # seen again, so Stopped again
            raise
        finally:
            with self._lock:
                self._stopping.pop(workload_id, None)
        return True

    def _revoke(self, node_id: str) -> None:
        join_db = os.environ.get(env_keys.JOIN_DB)
        if join_db:
            self._ticket_book(join_db).revoke(node_id)

    def _ticket_book(self, join_db: str) -> TicketBook:
        with self._lock:
            if self._tickets is None:
                self._tickets = TicketBook(Path(join_db))
            return self._tickets

    # ---- cluster launcher hooks ----------------------------------------------------------

    @staticmethod
    def fillout_available_node_types_resources(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Declares each node type's ``CPU`` (its cores) and ``memory`` (Ray's share of the VM's
        memory) unless ``cluster.yaml`` sets them: the autoscaler can place a demand that asks
        for memory only on a node type that declares it."""
        config = copy.deepcopy(cluster_config)
        for name, node_type in (config.get("available_node_types") or {}).items():
            node_config = NodeConfig.parse(node_type.get("node_config") or {}, name)
            resources = node_type.setdefault("resources", {})
            resources.setdefault("CPU", node_config.cores)
            resources.setdefault("memory", ray_memory_bytes(node_config.memory_mb))
        return config

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Validates the provider section and every node_config before ``ray up`` launches
        anything, and keeps a copy of the cluster config for the head's env (Hypercore can put
        no file into a workload; see ``command_runner``)."""
        ProviderConfig.parse(cluster_config["provider"])
        types = cluster_config.get("available_node_types") or {}
        if not types:
            raise ProviderConfigError("cluster.yaml declares no available_node_types")
        for name, node_type in types.items():
            NodeConfig.parse(node_type.get("node_config") or {}, name)
        config = copy.deepcopy(cluster_config)
        head_copy = copy.deepcopy(cluster_config)
        head_copy["provider"].pop(HEAD_CONFIG_KEY, None)
        head_copy["provider"].pop("_config_cache_path", None)
        head_copy.pop("head_node", None)
        config["provider"][HEAD_CONFIG_KEY] = head_copy
        return config

    def prepare_for_head_node(self, cluster_config: dict[str, Any]) -> dict[str, Any]:
        config = copy.deepcopy(cluster_config)
        config["provider"].pop(HEAD_CONFIG_KEY, None)
        return config

    def get_command_runner(
        self,
        log_prefix: str,
        node_id: str,
        auth_config: dict[str, Any],
        cluster_name: str,
        process_runner: ModuleType,
        use_internal_ip: bool,
        docker_config: dict[str, Any] | None = None,
    ) -> HypercoreCommandRunner:
        return HypercoreCommandRunner(self, node_id, self.config.head_start_timeout_s)


def _log_stop_failure(future: Future[bool]) -> None:
    error = future.exception()
    if error is not None:
        logger.warning(
            "cannot stop a workload of a terminated node (retried when next seen): %s", error
        )


def _node_type(node: ListedNode) -> str:
    # Bounded by cluster.yaml's node types; a workload without the tag is no node Ray made.
    return node.tags.get(TAG_RAY_USER_NODE_TYPE) or "unknown"


def _matches(tags: Mapping[str, str], tag_filters: Mapping[str, str]) -> bool:
    return all(tags.get(k) == v for k, v in tag_filters.items())
