"""The env a node workload is spawned with, and reading a provider node back out of List.

Hypercore's only inputs are cores, memory, image, ports and env, and its List echoes each
workload's Spawn request. So everything the provider must know about a node travels in that env
(the node agent's env contract, ``hyperfleet node``):

    HYPERFLEET_INSTANCE_ID   the provider's node id; stays the same when Hypercore respawns the
                             workload under a new workload id
    HYPERFLEET_CLUSTER       which cluster's provider owns the workload
    HYPERFLEET_TAGS          the creation tags, JSON
    HYPERFLEET_NODE_ROLE, HYPERFLEET_NODE_TYPE, HYPERFLEET_RESOURCES, HYPERFLEET_LABELS,
    HYPERFLEET_NUM_CPUS, HYPERFLEET_MEMORY_MB, HYPERFLEET_RAY_PORT (head),
    HYPERFLEET_HEAD_ADDRESS, HYPERFLEET_JOIN_URL, HYPERFLEET_JOIN_TICKET (workers),
    HYPERFLEET_AUTOSCALING_CONFIG_JSON (a head created by ``ray up``)

List shows env to anyone who can reach Hypercore: nothing here is a long-lived secret. The join
ticket is single-use, bound to the node id, and revoked when the node is terminated.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

INSTANCE_ID = "HYPERFLEET_INSTANCE_ID"
CLUSTER = "HYPERFLEET_CLUSTER"
TAGS = "HYPERFLEET_TAGS"
ROLE = "HYPERFLEET_NODE_ROLE"
NODE_TYPE = "HYPERFLEET_NODE_TYPE"
RESOURCES = "HYPERFLEET_RESOURCES"
LABELS = "HYPERFLEET_LABELS"
NUM_CPUS = "HYPERFLEET_NUM_CPUS"
MEMORY_MB = "HYPERFLEET_MEMORY_MB"
RAY_PORT = "HYPERFLEET_RAY_PORT"
HEAD_ADDRESS = "HYPERFLEET_HEAD_ADDRESS"
JOIN_URL = "HYPERFLEET_JOIN_URL"
JOIN_TICKET = "HYPERFLEET_JOIN_TICKET"
JOIN_DB = "HYPERFLEET_JOIN_DB"
AUTOSCALING_CONFIG_JSON = "HYPERFLEET_AUTOSCALING_CONFIG_JSON"

# Resources the node agent sets from its own flags or discovers (GPUs through NVML), not from JSON.
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def new_node_id(cluster_name: str) -> str:
    """A node id that names its cluster and is unique without asking anyone."""
    return f"hf-{cluster_name}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class NodeSpec:
    """Everything one node's env says, before it is flattened to ``K=V`` strings."""

    node_id: str
    cluster_name: str
    role: str  # "head" | "worker"
    node_type: str
    tags: Mapping[str, str]
    resources: Mapping[str, float]
    labels: Mapping[str, str]
    memory_mb: int
    ray_port: int | None = None
    head_address: str | None = None
    join_url: str | None = None
    join_ticket: str | None = None
    autoscaling_config: Mapping[str, object] | None = None


def node_env(spec: NodeSpec) -> tuple[str, ...]:
    """The Spawn env of a node: the node agent's contract, as ``K=V`` strings."""
    custom = {k: v for k, v in spec.resources.items() if k not in _BUILTIN_RESOURCES}
    env: dict[str, str] = {
        ROLE: spec.role,
        INSTANCE_ID: spec.node_id,
        CLUSTER: spec.cluster_name,
        NODE_TYPE: spec.node_type,
        TAGS: json.dumps(dict(spec.tags), sort_keys=True),
        RESOURCES: json.dumps(custom, sort_keys=True),
        LABELS: json.dumps(dict(spec.labels), sort_keys=True),
    }
    if "CPU" in spec.resources:
        env[NUM_CPUS] = str(int(spec.resources["CPU"]))
    # The VM's memory: the node agent splits it between Ray's heap and its object store.
    env[MEMORY_MB] = str(spec.memory_mb)
    optional = {
        RAY_PORT: str(spec.ray_port) if spec.ray_port is not None else None,
        HEAD_ADDRESS: spec.head_address,
        JOIN_URL: spec.join_url,
        JOIN_TICKET: spec.join_ticket,
        AUTOSCALING_CONFIG_JSON: (
            json.dumps(spec.autoscaling_config, sort_keys=True, separators=(",", ":"))
            if spec.autoscaling_config is not None
            else None
        ),
    }
    env.update({k: v for k, v in optional.items() if v is not None})
    return tuple(f"{k}={v}" for k, v in env.items())


def parse_env(env: Iterable[str]) -> dict[str, str]:
    """``K=V`` strings to a dict (values may contain ``=``; later entries win, as in a shell)."""
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


@dataclass(frozen=True)
class ListedNode:
    """One provider node as Hypercore's List shows it (the workload id changes on respawn)."""

    node_id: str
    workload_id: str
    tags: Mapping[str, str]


def listed_node(workload_id: str, env: Iterable[str], cluster_name: str) -> ListedNode | None:
    """The provider node a workload carries, or None if it is not one of ``cluster_name``'s."""
    values = parse_env(env)
    node_id = values.get(INSTANCE_ID)
    if not node_id or values.get(CLUSTER) != cluster_name:
        return None
    try:
        raw = json.loads(values.get(TAGS, "{}"))
    except json.JSONDecodeError:
        raw = {}
    tags = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return ListedNode(node_id=node_id, workload_id=workload_id, tags=tags)
