"""The ``ray start --block`` command of a node: its argv and environment from a pure function
(``ray_start_command``, tested on its own), and the address and ports it names.

Several nodes may share one machine (the local Hypercore stand-in gives each its own 127.x
address), so every Ray port but the head's GCS port is left to Ray to pick or bound to the node's
own address (the Ray Client server's 10001), and the object store is sized from
``HYPERFLEET_MEMORY_MB`` rather than from the whole machine's memory. The exception is the
raylet's port when the agent keeps spare workers (``warm_workers.py``): the agent picks a free
one, which another process could take in the second before the raylet binds it (then Ray fails
to start, as for any other start failure).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import gpus
from .join import SCRUBBED_ENV, HeadServices, host_port
from .settings import NodeRole, NodeSettings, NodeSettingsError, is_label_value

logger = logging.getLogger("hyperfleet.node")

OBJECT_STORE_FRACTION = 0.3  # Ray's own default share of memory
OBJECT_STORE_MIN_MB = 128  # Ray refuses less than 75 MiB
MIB = 1024 * 1024
# Autoscaler v2 waits this long (Ray's default: an hour) for Ray to run on an instance it allocated
# before it terminates the instance and launches another; until then the instance counts as
# coming up, so the demand it was for waits too. Starting a node takes seconds to a few minutes:
# at most the join deadline (HYPERFLEET_JOIN_TIMEOUT_S, 180 s by default) and three `ray start`s
# (each up to Ray's 30 s wait to register) 5 s and 10 s apart. The operator's own value wins.
AUTOSCALER_ALLOCATE_TIMEOUT_S = 600
# Ray's autoscaler sleeps 5 s between updates, and a pending replica waits for up to two of them
# (one to Spawn, one to see the node); at 1 s, the provider's List cache (1 s) bounds the cost to
# one List a second. The operator's own AUTOSCALER_UPDATE_INTERVAL_S wins.
AUTOSCALER_UPDATE_INTERVAL_S = 1
# Where a head without HYPERFLEET_NODE_IP looks for its outward address (no packet is sent).
ROUTE_PROBE = ("8.8.8.8", 53)
NODE_TYPE_LABEL = "hyperfleet/node-type"
INSTANCE_ID_LABEL = "hyperfleet/instance-id"
CLUSTER_LABEL = "hyperfleet/cluster"


@dataclass(frozen=True)
class RayStart:
    """How to run ``ray start``: its argv and its whole environment."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(repr=False)


def ray_start_command(
    settings: NodeSettings,
    gpu: gpus.RayGpuOptions,
    node_ip: str,
    token_path: Path,
    base_env: Mapping[str, str],
    ray_executable: str,
    head: HeadServices | None = None,
    node_manager_port: int = 0,
) -> RayStart:
    """The ``ray start --block`` command for this node; pure, so it is tested on its own.

    Args:
        settings: the node's settings.
        gpu: what ``gpus.ray_gpu_options`` made of the node's GPUs.
        node_ip: the address Ray advertises for this node.
        token_path: the Ray auth token file (0600).
        base_env: the environment to extend (the agent's own, normally).
        ray_executable: the ``ray`` CLI.
        head: the head's join service, exported for the autoscaler's provider (head only).
        node_manager_port: the raylet's port (0: Ray picks one); the agent names one so that
            it can reach its raylet to keep spare workers.
    """
    env = {k: v for k, v in base_env.items() if k not in SCRUBBED_ENV}
    env.update(gpu.env)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_CLOUD_INSTANCE_ID": settings.instance_id,
            "RAY_NODE_TYPE_NAME": settings.node_type,
            # uvicorn (Serve's proxy, each replica's HTTP port) would otherwise replace the TCP
            # peer with X-Forwarded-For sent from 127.0.0.1; the ingress finds the client itself
            # (serve_app/client_address.py; cluster.cli.servers.NODE_RAY_ENV for a local head).
            "FORWARDED_ALLOW_IPS": "",
        }
    )
    argv = [ray_executable, "start", "--block", "--disable-usage-stats"]
    argv.append(f"--node-ip-address={node_ip}")
    if settings.role is NodeRole.HEAD:
        assert head is not None, "the head needs its join service"
        gcs_address = host_port(node_ip, settings.ray_port)
        argv += ["--head", f"--port={settings.ray_port}"]
        env.update(
            {
                "HYPERFLEET_JOIN_DB": str(head.join_db),
                "HYPERFLEET_JOIN_URL": head.join_url,
                "HYPERFLEET_HEAD_ADDRESS": gcs_address,
            }
        )
        if settings.autoscaling_config is not None:
            argv.append(f"--autoscaling-config={settings.autoscaling_config}")
            env["RAY_enable_autoscaler_v2"] = "1"
            env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", str(AUTOSCALER_UPDATE_INTERVAL_S))
            env.setdefault(
                "RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S",
                str(AUTOSCALER_ALLOCATE_TIMEOUT_S),
            )
    else:
        assert settings.head_address is not None
        argv.append(f"--address={settings.head_address}")
    # 0: Ray picks a free port. Its default, 52365, is bound on 127.0.0.1 too by every node whose
    # address is not 127.0.0.1 (ray/dashboard/http_server_agent.py): nodes sharing a host collide.
    argv.append("--dashboard-agent-listen-port=0")
    if node_manager_port:
        argv.append(f"--node-manager-port={node_manager_port}")
    # This machine's own temp dir, as Ray picks the head's. Without it a worker uses the head's
    # path, and nodes sharing one host share a session directory: Ray names each node's sockets
    # by the first index free there and creates them only later, so two nodes starting at once
    # pick the same names and the second raylet dies on bind before it registers.
    argv.append(f"--temp-dir={ray_temp_dir(base_env)}")
    if settings.num_cpus is not None:
        argv.append(f"--num-cpus={settings.num_cpus}")
    argv.append(f"--num-gpus={gpu.num_gpus}")
    if settings.memory_mb is not None:
        object_store_mb = max(OBJECT_STORE_MIN_MB, int(settings.memory_mb * OBJECT_STORE_FRACTION))
        argv.append(f"--memory={(settings.memory_mb - object_store_mb) * MIB}")
        argv.append(f"--object-store-memory={object_store_mb * MIB}")
    # Discovered hardware wins over the env for MIG resources; identity labels win over both.
    resources = {**settings.resources, **gpu.resources}
    argv.append(f"--resources={json.dumps(resources, sort_keys=True)}")
    labels = {**gpu.labels, **settings.labels, NODE_TYPE_LABEL: settings.node_type}
    # Ray's node table carries the instance id either way; labels only when their syntax allows.
    for key, value in (
        (INSTANCE_ID_LABEL, settings.instance_id),
        (CLUSTER_LABEL, settings.cluster),
    ):
        if value and is_label_value(value):
            labels[key] = value
    argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
    return RayStart(tuple(argv), env)


def ray_temp_dir(env: Mapping[str, str]) -> str:
    """Ray's default temp dir for a head on this (Linux) machine, as
    ``ray._common.utils.get_default_ray_temp_dir`` finds it: ``RAY_TMPDIR``, else ``TMPDIR``,
    else /tmp, then ``ray``."""
    for name in ("RAY_TMPDIR", "TMPDIR"):
        if name in env:
            return os.path.join(env[name], "ray")
    return "/tmp/ray"  # noqa: S108 (Ray's default)


def detect_node_ip(toward: tuple[str, int]) -> str:
    """The local address of a UDP socket "connected" toward ``toward``: no packet is sent."""
    family = socket.AF_INET6 if ":" in toward[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(toward)
        return str(probe.getsockname()[0])


def node_ip_of(settings: NodeSettings) -> str:
    if settings.node_ip is not None:
        return settings.node_ip
    target = ROUTE_PROBE
    if settings.head_address is not None:
        host, _, port = settings.head_address.rpartition(":")
        target = (host.strip("[]"), int(port))
    try:
        return detect_node_ip(target)
    except OSError as e:
        raise NodeSettingsError(
            f"HYPERFLEET_NODE_IP: unset, and no route toward {target[0]} to find it ({e})"
        ) from e


def free_port_on(ip: str) -> int:
    """A TCP port free on every address of ``ip``'s family now, for a Ray port: Ray may bind
    it on all addresses, and other nodes on this machine hold ports on their own addresses."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        port: int = probe.getsockname()[1]
        return port


def raylet_port_for(settings: NodeSettings, node_ip: str) -> int:
    """The port to give the raylet: one the spare-worker keeper can reach it on, or 0 (Ray picks)
    when the node keeps no spares or no port could be found (then it keeps none)."""
    if not settings.warm_workers:
        return 0
    try:
        return free_port_on(node_ip)
    except OSError as e:
        logger.warning("spare workers: no free port for the raylet (%s); keeping none", e)
        return 0
