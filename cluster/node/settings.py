"""The node agent's settings: the env a Hypercore workload is spawned with, validated once.

Hypercore has no command override, so the provider describes each node entirely in env (the
"node agent env contract"). Every variable is checked here and a bad one is reported by its name,
so a mistyped cluster.yaml shows up in the workload's log as ``HYPERFLEET_NUM_CPUS: ...`` rather
than as a Ray traceback. Label keys and values follow Ray's rules (Kubernetes label syntax), checked
here without importing Ray.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Json,
    SecretStr,
    ValidationError,
    model_validator,
)

from hyperfleet import ports
from hyperfleet.errors import HyperfleetError

DEFAULT_RAY_PORT = ports.RAY_GCS_PORT  # as `hyperfleet up`
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # Ray's RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S default
DEFAULT_JOIN_TIMEOUT_S = 180.0
# Where the agent serves its metrics on the node's address (the head's provider serves on 9102).
DEFAULT_METRICS_PORT = 9103
DEFAULT_WARM_WORKERS = 1  # spare Ray worker processes per node (warm_workers.py)
MAX_WARM_WORKERS = 8
MIN_MEMORY_MB = 512
MAX_INSTANCE_ID_CHARS = 256
MAX_LABEL_CHARS = 63
MAX_LABEL_PREFIX_CHARS = 253
# Ray reserves these names: --num-cpus/--num-gpus/--memory set them, not --resources.
RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
RAY_LABEL_PREFIX = "ray.io/"

_LABEL = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")
_LABEL_PREFIX = re.compile(rf"{_LABEL.pattern}(\.{_LABEL.pattern})*")


class NodeSettingsError(HyperfleetError):
    """The node's env is invalid; the message names each bad variable."""

    status_code = 400
    error_type = "invalid_node_settings"


class NodeRole(StrEnum):
    HEAD = "head"
    WORKER = "worker"


def check_label_value(value: str) -> str:
    if value and (len(value) > MAX_LABEL_CHARS or not _LABEL.fullmatch(value)):
        raise ValueError(
            f"{value!r} is not a Ray label value: at most {MAX_LABEL_CHARS} characters, "
            "alphanumeric at both ends, '-', '_' or '.' between"
        )
    return value


def is_label_value(value: str) -> bool:
    try:
        check_label_value(value)
    except ValueError:
        return False
    return True


def check_label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > MAX_LABEL_PREFIX_CHARS or not _LABEL_PREFIX.fullmatch(prefix)):
        raise ValueError(f"label key {key!r}: its prefix must be a DNS subdomain")
    if not name or len(name) > MAX_LABEL_CHARS or not _LABEL.fullmatch(name):
        raise ValueError(f"label key {key!r}: its name is not a Ray label name")
    if key.startswith(RAY_LABEL_PREFIX):
        raise ValueError(f"label key {key!r}: the prefix {RAY_LABEL_PREFIX} is Ray's own")
    return key


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        check_label_key(key)
        check_label_value(value)
    return labels


def _check_resources(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if name in RESERVED_RESOURCES:
            raise ValueError(f"{name!r} is set by its own variable, not as a custom resource")
        if not name or "," in name:
            raise ValueError(f"{name!r} is not a resource name")
        if amount < 0:
            raise ValueError(f"resource {name!r} is negative")
    return resources


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value.rstrip("/")


def _check_ip(value: str) -> str:
    return str(ipaddress.ip_address(value))


LabelValue = Annotated[str, AfterValidator(check_label_value), Field(min_length=1)]
Labels = Annotated[Json[dict[str, str]], AfterValidator(_check_labels)]
Resources = Annotated[Json[dict[str, float]], AfterValidator(_check_resources)]
HostPort = Annotated[str, AfterValidator(_check_host_port)]
Url = Annotated[str, AfterValidator(_check_url)]
IpAddress = Annotated[str, AfterValidator(_check_ip)]


class NodeSettings(BaseModel):
    """One node's settings, from the env the provider spawned its workload with.

    Field aliases are the variable names, so validation errors name the variable. Beyond the
    contract, optional: ``HYPERFLEET_JOIN_PORT`` (head; default: any free port, exported to Ray as
    ``HYPERFLEET_JOIN_URL``), ``HYPERFLEET_JOIN_TIMEOUT_S`` (worker; how long to keep trying the
    head), ``HYPERFLEET_WARM_WORKERS`` (spare Ray workers kept started, 0 to 8, default 1; see
    ``warm_workers.py``), ``HYPERFLEET_METRICS_PORT`` (the agent's Prometheus metrics on the
    node's address, default 9103, 0 for none) and ``HYPERFLEET_AUTOSCALING_CONFIG_JSON`` (head;
    the autoscaler config inline, as the provider passes it to a head that ``ray up`` creates).
    ``HYPERFLEET_TAGS`` is the provider's and is ignored.
    ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` is Ray's own setting, read here too because the
    node agent waits that long (plus teardown) for ``ray start`` after forwarding SIGTERM.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: NodeRole = Field(alias="HYPERFLEET_NODE_ROLE")
    instance_id: str = Field(
        min_length=1, max_length=MAX_INSTANCE_ID_CHARS, alias="HYPERFLEET_INSTANCE_ID"
    )
    # Ray turns RAY_NODE_TYPE_NAME into its ray.io/node-group label: label syntax applies.
    node_type: LabelValue = Field(alias="HYPERFLEET_NODE_TYPE")
    cluster: str | None = Field(default=None, alias="HYPERFLEET_CLUSTER")
    node_ip: IpAddress | None = Field(default=None, alias="HYPERFLEET_NODE_IP")
    head_address: HostPort | None = Field(default=None, alias="HYPERFLEET_HEAD_ADDRESS")
    join_url: Url | None = Field(default=None, alias="HYPERFLEET_JOIN_URL")
    join_ticket: SecretStr | None = Field(default=None, alias="HYPERFLEET_JOIN_TICKET")
    join_timeout_s: float = Field(
        default=DEFAULT_JOIN_TIMEOUT_S, gt=0, alias="HYPERFLEET_JOIN_TIMEOUT_S"
    )
    join_port: int = Field(default=0, ge=0, le=65535, alias="HYPERFLEET_JOIN_PORT")
    # Head only, for nodes that are not Hypercore workloads: <dir>/<instance id>.log is a node's
    # console, where the join service looks for its key (docs/join.md).
    join_consoles_dir: Path | None = Field(default=None, alias="HYPERFLEET_JOIN_CONSOLES_DIR")
    ray_port: int = Field(default=DEFAULT_RAY_PORT, ge=1, le=65535, alias="HYPERFLEET_RAY_PORT")
    num_cpus: int | None = Field(default=None, ge=0, alias="HYPERFLEET_NUM_CPUS")
    memory_mb: int | None = Field(default=None, ge=MIN_MEMORY_MB, alias="HYPERFLEET_MEMORY_MB")
    resources: Resources = Field(default_factory=dict, alias="HYPERFLEET_RESOURCES")
    labels: Labels = Field(default_factory=dict, alias="HYPERFLEET_LABELS")
    home: Path = Field(alias="HYPERFLEET_HOME")
    autoscaling_config: Path | None = Field(default=None, alias="HYPERFLEET_AUTOSCALING_CONFIG")
    autoscaling_config_json: Json[dict[str, Any]] | None = Field(
        default=None, alias="HYPERFLEET_AUTOSCALING_CONFIG_JSON"
    )
    warm_workers: int = Field(
        default=DEFAULT_WARM_WORKERS, ge=0, le=MAX_WARM_WORKERS, alias="HYPERFLEET_WARM_WORKERS"
    )
    metrics_port: int = Field(
        default=DEFAULT_METRICS_PORT, ge=0, le=65535, alias="HYPERFLEET_METRICS_PORT"
    )
    drain_timeout_s: float = Field(
        default=DEFAULT_DRAIN_TIMEOUT_S, ge=0, alias="RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"
    )

    @model_validator(mode="after")
    def _role_needs(self) -> NodeSettings:
        if self.role is NodeRole.WORKER:
            missing = [
                name
                for name, value in (
                    ("HYPERFLEET_HEAD_ADDRESS", self.head_address),
                    ("HYPERFLEET_JOIN_URL", self.join_url),
                    ("HYPERFLEET_JOIN_TICKET", self.join_ticket),
                )
                if value is None
            ]
            if missing:
                raise ValueError(f"a worker node needs {', '.join(missing)}")
            for name, value in (
                ("HYPERFLEET_AUTOSCALING_CONFIG", self.autoscaling_config),
                ("HYPERFLEET_AUTOSCALING_CONFIG_JSON", self.autoscaling_config_json),
            ):
                if value is not None:
                    raise ValueError(f"{name} is for the head only")
        elif self.autoscaling_config is not None and self.autoscaling_config_json is not None:
            raise ValueError(
                "set HYPERFLEET_AUTOSCALING_CONFIG or HYPERFLEET_AUTOSCALING_CONFIG_JSON, not both"
            )
        elif self.autoscaling_config is not None and not self.autoscaling_config.is_file():
            raise ValueError(f"HYPERFLEET_AUTOSCALING_CONFIG: no file {self.autoscaling_config}")
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeSettings:
        """Reads and validates the settings; raises ``NodeSettingsError`` naming each bad one.

        Empty variables count as unset. ``HYPERFLEET_HOME`` defaults to ``~/.hyperfleet``.
        """
        names = {field.alias for field in cls.model_fields.values()}
        values: dict[str, Any] = {k: v for k, v in env.items() if k in names and v != ""}
        values.setdefault("HYPERFLEET_HOME", str(Path("~/.hyperfleet").expanduser()))
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = []
            for error in e.errors(include_url=False, include_input=False):
                where = ".".join(str(part) for part in error["loc"]) or "env"
                problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
            raise NodeSettingsError("; ".join(problems)) from e
