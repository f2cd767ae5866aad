"""The ``provider:`` section of ``cluster.yaml`` and each node type's ``node_config``, validated.

Ray hands the provider plain dicts; they are checked here once, at construction, so a typo in
``cluster.yaml`` fails ``ray up`` with a message naming the key instead of failing a launch later
inside the autoscaler. Keys Ray itself reads from the provider section are accepted as they are;
keys Ray adds at run time start with ``_`` and are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hyperfleet.errors import HyperfleetError

DEFAULT_IMAGE = "ghcr.io/hyperfleet/node:latest"
# The local stand-in's default (`hyperfleet hypercore serve`); a real Hypercore listens on 8000.
DEFAULT_HYPERCORE_GRPC_ADDRESS = "127.0.0.1:8100"
# Not 6379 (Redis), nor `hyperfleet up`'s 6385 (its head) and 6390 (its Redis).
DEFAULT_HEAD_RAY_PORT = 6386
# Hypercore allows a host up to 90 s to pull an image and start a workload inside one Spawn.
DEFAULT_SPAWN_TIMEOUT_S = 120.0
DEFAULT_CALL_TIMEOUT_S = 10.0
# Hypercore refreshes List about every 5 s; reading it more often than this only adds load.
DEFAULT_LIST_CACHE_TTL_S = 1.0
# How often Hypercore rebuilds the List it serves (and respawns exited workloads).
DEFAULT_HYPERCORE_REFRESH_INTERVAL_S = 5.0
DEFAULT_TICKET_TTL_S = 900.0
DEFAULT_HEAD_START_TIMEOUT_S = 300.0
# Where the provider serves its metrics (docs/observability.md), on the head's address; next to
# Prometheus's node exporter (9100), and 9103 is the node agent's.
DEFAULT_METRICS_PORT = 9102
# How the node agent splits a VM's memory (cluster/node, ray_start_command): Ray's own default
# share for the object store, at least 128 MiB; the rest is Ray's ``memory`` resource.
OBJECT_STORE_FRACTION = 0.3
OBJECT_STORE_MIN_MB = 128
MIB = 1024 * 1024


def ray_memory_bytes(memory_mb: int) -> int:
    """The ``memory`` resource Ray gets on a VM of ``memory_mb`` started by the node agent."""
    object_store_mb = max(OBJECT_STORE_MIN_MB, int(memory_mb * OBJECT_STORE_FRACTION))
    return (memory_mb - object_store_mb) * MIB


class ProviderConfigError(HyperfleetError, ValueError):
    """``cluster.yaml``'s provider section or a node type's ``node_config`` is invalid."""

    status_code = 400
    error_type = "invalid_request"


class ProviderConfig(BaseModel):
    """The provider section of ``cluster.yaml`` (``provider: {type: external, module: ...}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["external"] = "external"
    module: str = "autoscaling.provider.HypercoreNodeProvider"
    hypercore_address: str = Field(
        default=DEFAULT_HYPERCORE_GRPC_ADDRESS,
        pattern=r"^[^\s:/]+:\d{1,5}$",
        description="host:port of Hypercore's gRPC API (8000) or its HTTP mirror (8001)",
    )
    transport: Literal["grpc", "http"] = "grpc"
    call_timeout_s: float = Field(default=DEFAULT_CALL_TIMEOUT_S, gt=0, le=300)
    spawn_timeout_s: float = Field(
        default=DEFAULT_SPAWN_TIMEOUT_S,
        gt=0,
        le=900,
        description="Spawn and Stop: Hypercore answers a Stop of an unknown id only after its "
        "cluster query times out (90 s), and a Stop waits 5 s before SIGKILL",
    )
    list_cache_ttl_s: float = Field(default=DEFAULT_LIST_CACHE_TTL_S, ge=0, le=60)
    hypercore_refresh_interval_s: float = Field(
        default=DEFAULT_HYPERCORE_REFRESH_INTERVAL_S,
        gt=0,
        le=60,
        description="Hypercore's List refresh interval: terminate watches List this long for "
        "a workload Hypercore respawned from a stale entry",
    )
    default_image: str = Field(default=DEFAULT_IMAGE, min_length=1)
    head_ray_port: int = Field(default=DEFAULT_HEAD_RAY_PORT, ge=1, le=65535)
    head_start_timeout_s: float = Field(default=DEFAULT_HEAD_START_TIMEOUT_S, gt=0, le=3600)
    ticket_ttl_s: float = Field(default=DEFAULT_TICKET_TTL_S, gt=0, le=86400)
    metrics_port: int = Field(
        default=DEFAULT_METRICS_PORT,
        ge=0,
        le=65535,
        description="the port on the head's address where the provider in the head's autoscaler "
        "serves its Prometheus metrics (/metrics); 0 serves none",
    )
    state_dir: Path | None = Field(
        default=None,
        description="where tags Ray updates are kept (default: $HYPERFLEET_HOME/autoscaler)",
    )
    # Ray's own keys, with Ray's defaults: Ray reads them from the raw dict, not from here.
    use_internal_ips: bool = False
    use_external_head_ip: bool = False
    disable_node_updaters: bool = Field(
        default=False,
        validate_default=True,
        description="must be true: the image's node agent starts Ray, nothing is installed",
    )
    disable_launch_config_check: bool = True
    foreground_node_launch: bool = False
    worker_liveness_check: bool = True
    head_node_type: str | None = None

    @field_validator("disable_node_updaters")
    @classmethod
    def _no_updaters(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "set disable_node_updaters: true: Hypercore workloads cannot run commands, and "
                "the image's node agent starts Ray itself"
            )
        return value

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ProviderConfig:
        """Validates Ray's provider dict, ignoring the ``_``-prefixed keys Ray adds itself.

        Raises:
            ProviderConfigError: naming every invalid key.
        """
        fields = {k: v for k, v in raw.items() if not k.startswith("_")}
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            raise ProviderConfigError(f"cluster.yaml provider: {_describe(e)}") from e

    def resolved_state_dir(self, env: Mapping[str, str] | None = None) -> Path:
        if self.state_dir is not None:
            return self.state_dir.expanduser()
        env = os.environ if env is None else env
        home = env.get("HYPERFLEET_HOME") or str(Path.home() / ".hyperfleet")
        return Path(home).expanduser() / "autoscaler"


class NodeConfig(BaseModel):
    """A node type's ``node_config``: what one Spawn asks Hypercore for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cores: int = Field(ge=1, le=225, description="vCPUs of the workload")
    memory_mb: int = Field(ge=128, description="memory of the workload in MiB")
    image: str | None = Field(
        default=None, min_length=1, description="image_ref; default: the provider's default_image"
    )
    ports: dict[int, int] = Field(
        default_factory=dict, description="host port -> workload port (Hypercore's proxy)"
    )

    @classmethod
    def parse(cls, raw: Mapping[str, Any], node_type: str) -> NodeConfig:
        """Validates one node type's ``node_config``.

        Raises:
            ProviderConfigError: naming the node type and every invalid key.
        """
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as e:
            raise ProviderConfigError(
                f"cluster.yaml node type {node_type!r}, node_config: {_describe(e)}"
            ) from e


def _describe(error: ValidationError) -> str:
    """One line per problem, naming the key: ``memory_mb: Field required``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'config'}: {item['msg']}"
        for item in error.errors(include_url=False, include_input=False)
    )
