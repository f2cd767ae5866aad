"""The operator's settings for agent pools: the defaults an agent's ``replicas`` block takes for
what it leaves out, the fleet's limits, the warm pool, and the controller's timing.

``policy_for`` turns an agent's (completed) spec and these settings into the pure policy's
parameters (``pool_policy.PoolPolicy``); ``complete_spec`` fills the spec at creation, so that a
stored spec is whole and a later change of the operator's defaults does not move running agents.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.spec import AgentSpec

from .pool_policy import PoolPolicy

# Measured on this project's 2-core machine (benchmarks/RESULTS.md): a replica on a node with
# room answers its health check ~0.35 s after it is asked for; one that needs a new VM, ~8 s.
WARM_START_S = 0.35
VM_START_S = 8.0


class PoolConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tick_s: float = Field(default=2.0, ge=0.1, le=60, description="how often pools are observed")
    fleet_max_replicas: int = Field(
        default=1_000, ge=1, le=100_000, description="replicas of every agent, in all"
    )
    warm_floor: int = Field(
        default=10,
        ge=0,
        le=10_000,
        description="replica slots the cluster keeps, in use or not (request_resources)",
    )
    warm_spare: int = Field(
        default=1, ge=0, le=1_000, description="free replica slots kept beyond those in use"
    )
    scale_up_at: float = Field(default=0.8, gt=0, le=1)
    scale_down_at: float = Field(default=0.3, gt=0, lt=1)
    scale_up_cooldown_s: float = Field(default=15.0, ge=0, le=3_600)
    scale_down_cooldown_s: float = Field(default=300.0, ge=0, le=86_400)
    # The shortest cooldowns an agent may ask for: a pool that may scale every tick churns
    # replicas (and, for vm isolation, VMs).
    min_scale_up_cooldown_s: float = Field(default=1.0, ge=0, le=3_600)
    min_scale_down_cooldown_s: float = Field(default=30.0, ge=0, le=86_400)
    lead_time_s: float = Field(
        default=VM_START_S, ge=0, le=600, description="how far ahead the trend looks"
    )
    drain_timeout_s: float = Field(
        default=900.0,
        ge=1,
        le=3_600,
        description="the longest a draining replica waits for its turns (and at most the "
        "agent's turn_timeout_s plus 30 s)",
    )
    start_timeout_s: float = Field(
        default=900.0, ge=1, le=86_400, description="the longest a replica may take to start"
    )
    replica_unresponsive_s: float = Field(
        default=30.0,
        ge=3,
        le=3_600,
        description="how long a ready replica may leave the controller's probes unanswered "
        "(hung, paused, cut off, or restarting too slowly) before it is replaced: its sessions "
        "move to the other ready replicas and it is killed",
    )
    capacity_wait_s: float = Field(
        default=20.0,
        ge=0,
        le=120,
        description="how long a session open that found every replica full waits for one",
    )

    @model_validator(mode="after")
    def _band(self) -> PoolConfig:
        if self.scale_down_at >= self.scale_up_at:
            raise ValueError("pool: scale_down_at must be below scale_up_at")
        return self


def complete_spec(spec: AgentSpec, config: PoolConfig) -> AgentSpec:
    """``spec`` with the scaling fields it leaves out set from the operator's defaults.

    Raises:
        ValueError: the completed thresholds leave no band (down at or above up), or a
            cooldown is below the operator's floor.
    """
    replicas = spec.replicas
    filled: dict[str, Any] = {
        name: getattr(config, name)
        for name in ("scale_up_at", "scale_down_at", "scale_up_cooldown_s", "scale_down_cooldown_s")
        if getattr(replicas, name) is None
    }
    for name, floor in (
        ("scale_up_cooldown_s", config.min_scale_up_cooldown_s),
        ("scale_down_cooldown_s", config.min_scale_down_cooldown_s),
    ):
        asked = getattr(replicas, name)
        if asked is not None and asked < floor:
            raise ValueError(f"replicas.{name}: at least {floor:g} s on this platform")
    if not filled:
        return spec
    merged = type(replicas).model_validate({**replicas.model_dump(), **filled})
    return spec.model_copy(update={"replicas": merged})


def policy_for(spec: AgentSpec, config: PoolConfig) -> PoolPolicy:
    """The pure policy's parameters for one agent."""
    r = complete_spec(spec, config).replicas
    assert r.scale_up_at is not None and r.scale_down_at is not None  # completed above
    assert r.scale_up_cooldown_s is not None and r.scale_down_cooldown_s is not None
    return PoolPolicy(
        min_replicas=r.min,
        max_replicas=r.max,
        max_sessions=spec.max_sessions,
        scale_up_at=r.scale_up_at,
        scale_down_at=r.scale_down_at,
        # A spec stored before the operator raised a floor is held to the floor too.
        scale_up_cooldown_s=max(r.scale_up_cooldown_s, config.min_scale_up_cooldown_s),
        scale_down_cooldown_s=max(r.scale_down_cooldown_s, config.min_scale_down_cooldown_s),
        lead_time_s=config.lead_time_s,
    )


def drain_deadline_s(spec: AgentSpec, config: PoolConfig) -> float:
    """How long a draining replica of ``spec`` waits for its running turns."""
    return min(config.drain_timeout_s, spec.turn_timeout_s + 30.0)
