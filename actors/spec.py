"""What an agent is: ``AgentSpec``, validated at the edge, and where its replicas may run.

Placement is derived here, as a pure function, so the rules are tested without Ray:
- ``resources.cores`` / ``memory_mb`` / ``gpus`` (a fraction shares one device) become Ray's
  ``num_cpus`` / ``memory`` / ``num_gpus``; a ``mig_profile`` becomes one unit of the custom
  resource the node agent advertises for that MIG profile (Ray has no MIG detection of its own);
- ``isolation: vm`` asks for the node's single VM-slot resource, so the replica has the VM to itself
  and one tenant's tools never share a VM with another's;
- ``label_selector`` is passed through (enforced by Ray for actors, unlike node-label strategies).

What a tenant (a user who is not an administrator) may ask for on top of these bounds is the
ingress's decision (``serve_app/tenancy.py``): the spec says what is possible, not what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from hyperfleet.resources import MIG_RESOURCE_PREFIX, VM_SLOT_RESOURCE

BUILTIN_TOOLS = ("bash", "read_file", "write_file", "list_files")
SHELL_TOOLS = frozenset({"bash"})
_CUSTOM_TOOL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MIG_PROFILE = re.compile(r"^\d+g\.\d+gb(\+me)?$")
MAX_SYSTEM_CHARS = 200_000


class Resources(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cores: float = Field(default=1.0, ge=0, le=256)
    memory_mb: int = Field(default=1024, ge=64, le=1_048_576)
    gpus: float = Field(default=0.0, ge=0, le=16)
    mig_profile: str | None = Field(default=None, description="e.g. 1g.10gb")

    @model_validator(mode="after")
    def _check(self) -> Resources:
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError("gpus above 1 must be a whole number of devices")
        if self.mig_profile is not None:
            if not _MIG_PROFILE.match(self.mig_profile):
                raise ValueError(f"mig_profile {self.mig_profile!r} is not like '1g.10gb'")
            if self.gpus:
                raise ValueError("ask for gpus or a mig_profile, not both")
        return self


class ToolLimits(BaseModel):
    """What one tool call's processes may use (``actors/tools/sandbox.py`` applies them).

    ``processes``, ``memory_mb``, ``cpu_s`` and ``file_size_mb`` are rlimits set inside the
    sandbox (RLIMIT_NPROC counted in the call's own user namespace, RLIMIT_AS and RLIMIT_CPU per
    process, RLIMIT_FSIZE per file); ``disk_mb`` is the session workspace's quota; ``tmp_mb`` the
    size of each of the call's in-memory ``/tmp`` and ``/dev/shm``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    processes: int = Field(default=256, ge=8, le=16_384, description="processes and threads")
    memory_mb: int = Field(default=2048, ge=64, le=1_048_576, description="per process")
    cpu_s: int = Field(default=120, ge=1, le=86_400, description="CPU seconds per process")
    file_size_mb: int = Field(default=1024, ge=1, le=1_048_576, description="largest file")
    disk_mb: int = Field(default=2048, ge=1, le=1_048_576, description="the workspace's quota")
    tmp_mb: int = Field(default=256, ge=1, le=65_536, description="in-memory tmp dirs, each")


class Replicas(BaseModel):
    """How many replicas an agent runs, and how the pool controller scales them between ``min``
    and ``max`` (``autoscaling/pool_policy.py``). The four scaling fields left out take the
    operator's defaults (``PoolConfig``) when the agent is created, so a stored spec is whole."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: int = Field(default=1, ge=0, le=1000)
    max: int = Field(default=1, ge=1, le=1000)
    scale_up_at: float | None = Field(
        default=None, gt=0, le=1, description="utilisation above which replicas are added"
    )
    scale_down_at: float | None = Field(
        default=None, gt=0, lt=1, description="utilisation below which replicas are removed"
    )
    scale_up_cooldown_s: float | None = Field(default=None, ge=0, le=3_600)
    scale_down_cooldown_s: float | None = Field(default=None, ge=0, le=86_400)

    @model_validator(mode="after")
    def _check(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) is above replicas.max ({self.max})")
        up, down = self.scale_up_at, self.scale_down_at
        if up is not None and down is not None and down >= up:
            raise ValueError(
                f"replicas.scale_down_at ({down}) must be below replicas.scale_up_at ({up})"
            )
        return self


class AgentSpec(BaseModel):
    """A Claude agent's configuration. ``anthropic_api_key`` (the owner's own key) is a secret:
    it never appears in ``public_json``, ``repr`` or logs; without it the platform's key is used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(default="claude-sonnet-5-5", min_length=1, max_length=128)
    system: str = Field(default="", max_length=MAX_SYSTEM_CHARS)
    tools: tuple[str, ...] = Field(default=(), max_length=64)
    max_turns: int = Field(default=20, ge=1, le=200, description="model calls per message")
    max_tokens: int = Field(default=4096, ge=1, le=128_000)
    temperature: float | None = Field(default=None, ge=0, le=1)
    max_sessions: int = Field(default=100, ge=1, le=10_000, description="per replica")
    session_idle_ttl_s: float = Field(default=900.0, ge=1, le=86_400)
    turn_timeout_s: float = Field(default=600.0, ge=1, le=3_600, description="wall clock per turn")
    max_queued_turns: int = Field(
        default=10,
        ge=0,
        le=100,
        description='turns a session holds waiting behind the running one (if_busy: "enqueue")',
    )
    tool_timeout_s: float = Field(default=60.0, ge=1, le=3_600)
    tool_limits: ToolLimits = Field(default_factory=ToolLimits)
    resources: Resources = Field(default_factory=Resources)
    isolation: Literal["vm", "shared"] | None = Field(
        default=None, description="default: vm when a shell tool is offered, else shared"
    )
    egress: bool = Field(default=False, description="network access for tool processes")
    replicas: Replicas = Field(default_factory=Replicas)
    label_selector: dict[str, str] = Field(default_factory=dict, max_length=16)
    anthropic_api_key: SecretStr | None = None

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, tools: tuple[str, ...]) -> tuple[str, ...]:
        for tool in tools:
            if tool not in BUILTIN_TOOLS and not _CUSTOM_TOOL.match(tool):
                raise ValueError(
                    f"unknown tool {tool!r}: use one of {', '.join(BUILTIN_TOOLS)} "
                    "or a custom tool as 'module:function'"
                )
        if len(set(tools)) != len(tools):
            raise ValueError("tools are listed more than once")
        return tools

    @property
    def effective_isolation(self) -> Literal["vm", "shared"]:
        if self.isolation is not None:
            return self.isolation
        return "vm" if SHELL_TOOLS.intersection(self.tools) else "shared"

    @property
    def credential(self) -> Literal["own", "platform"]:
        return "own" if self.anthropic_api_key is not None else "platform"

    def public_json(self) -> dict[str, Any]:
        """The spec as an API may show it: no secret, the credential kind instead."""
        data = self.model_dump(mode="json", exclude={"anthropic_api_key"})
        data["isolation"] = self.effective_isolation
        data["credential"] = self.credential
        return data


def placement_options(spec: AgentSpec) -> dict[str, Any]:
    """Ray actor options that place one replica of ``spec``."""
    r = spec.resources
    resources: dict[str, float] = {}
    if r.mig_profile is not None:
        resources[MIG_RESOURCE_PREFIX + r.mig_profile] = 1.0
    if spec.effective_isolation == "vm":
        resources[VM_SLOT_RESOURCE] = 1.0
    options: dict[str, Any] = {
        "num_cpus": r.cores,
        "memory": r.memory_mb * 1024 * 1024,
        "resources": resources,
    }
    if r.gpus:
        options["num_gpus"] = r.gpus
    if spec.label_selector:
        options["label_selector"] = dict(spec.label_selector)
    return options
