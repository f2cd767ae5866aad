"""What a tenant's agent may be: the operator's policy, checked when the agent is created.

An administrator's agents are the platform's own and keep every freedom the spec allows. Any
other user is a tenant, and a tenant must never choose the head (the stores, the GCS and the Ray
token live there) nor share a node's kernel with another tenant's shells:

- An agent with a shell tool (``bash``, or any tool that runs processes) runs with
  ``isolation: vm``: each replica takes its node's one VM slot. An explicit ``shared`` is refused
  (422, naming the field), not silently changed to ``vm``: the spec stored and shown is the one
  that runs, and a client that asked to pack learns at once that it cannot, rather than from
  placements and a bill it did not expect.
- ``label_selector`` keys are on the operator's allow-list; each value is a plain label value (no
  ``!`` or ``in(...)``: a negation matches every node without the label, the head included), and
  never one the head node carries for that key (read from Ray's node table).
- ``resources.cores`` is at least ``min_cores``: a replica of 0 cores would be placed anywhere,
  without bound, next to anything.
- ``tool_limits`` are within the operator's caps.

Quotas on how much a user runs (agents, replicas, cores, sessions) are the control store's, per
user (``control.py``); this module is about what one agent may be.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from actors import AgentSpec, ToolLimits

SHELL_TOOLS = frozenset({"bash"})
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _default_caps() -> ToolLimits:
    return ToolLimits(
        processes=4096,
        memory_mb=16_384,
        cpu_s=3_600,
        file_size_mb=16_384,
        disk_mb=16_384,
        tmp_mb=4096,
    )


class TenantPolicy(BaseModel):
    """The operator's rules for tenants' agents (``serve_config.yaml``: ``tenants``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label_selector_keys: tuple[str, ...] = Field(
        default=("hyperfleet/pool", "hyperfleet/node-type", "hyperfleet/accelerator"),
        description="node label keys a tenant's label_selector may name",
    )
    min_cores: float = Field(default=0.1, gt=0, le=256, description="resources.cores at least")
    max_tool_limits: ToolLimits = Field(
        default_factory=_default_caps, description="tool_limits at most"
    )


class TenantSpecError(ValueError):
    """A spec a tenant may not have; ``field`` names what to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_tenant_spec(spec: AgentSpec, policy: TenantPolicy) -> None:
    """Raises ``TenantSpecError`` for the first thing in ``spec`` a tenant may not ask for, but
    a label value of the head's (``check_not_the_head``, which needs Ray's node table)."""
    shells = sorted(SHELL_TOOLS.intersection(spec.tools))
    if shells and spec.effective_isolation != "vm":
        raise TenantSpecError(
            "isolation",
            f"agents with shell tools ({', '.join(shells)}) run with isolation 'vm', so that no "
            "other tenant's tools share their node; leave isolation out or set it to 'vm'",
        )
    for key, value in spec.label_selector.items():
        where = f"label_selector.{key}"
        if key not in policy.label_selector_keys:
            allowed = ", ".join(policy.label_selector_keys) or "none"
            raise TenantSpecError(
                where, f"not a label this platform lets you select on ({allowed})"
            )
        if not _LABEL_VALUE.match(value):
            raise TenantSpecError(where, f"{value!r} is not a plain label value (no operators)")
    if spec.resources.cores < policy.min_cores:
        raise TenantSpecError(
            "resources.cores",
            f"must be at least {policy.min_cores:g} (asked: {spec.resources.cores:g})",
        )
    caps = policy.max_tool_limits
    for name, asked in spec.tool_limits.model_dump().items():
        cap = getattr(caps, name)
        if asked > cap:
            raise TenantSpecError(f"tool_limits.{name}", f"must be at most {cap} (asked: {asked})")


def check_not_the_head(selector: Mapping[str, str], head_labels: Mapping[str, str]) -> None:
    """Raises ``TenantSpecError`` when a (plain) label selector names a label the head has."""
    for key, value in selector.items():
        if head_labels.get(key) == value:
            raise TenantSpecError(
                f"label_selector.{key}", f"{value!r} selects the head node, which runs no agents"
            )
