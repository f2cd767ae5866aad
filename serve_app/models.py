"""Request bodies of the HTTP API, validated with pydantic (a violation: 422 naming the field)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from actors import AgentSpec, Resources

from .records import (
    DEFAULT_MAX_AGENTS,
    DEFAULT_MAX_CORES,
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_REPLICAS,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_REQUESTS_PER_MINUTE,
)

MAX_MESSAGE_CHARS = 200_000


class Quotas(BaseModel):
    """A user's quotas; the defaults are the operator's (``IngressConfig.default_quotas``)."""

    model_config = ConfigDict(extra="forbid")

    max_agents: int = Field(default=DEFAULT_MAX_AGENTS, ge=0, le=100_000)
    requests_per_minute: int = Field(default=DEFAULT_REQUESTS_PER_MINUTE, ge=1, le=1_000_000)
    tokens_per_day: int | None = Field(default=None, ge=0)
    max_replicas: int = Field(
        default=DEFAULT_MAX_REPLICAS, ge=0, le=100_000, description="replicas of all agents"
    )
    max_cores: float = Field(
        default=DEFAULT_MAX_CORES, ge=0, le=1_000_000, description="cores of all replicas"
    )
    max_sessions: int = Field(
        default=DEFAULT_MAX_SESSIONS, ge=0, le=10_000_000, description="open sessions"
    )
    # At least 1: a new user is created together with its first key.
    max_keys: int = Field(
        default=DEFAULT_MAX_KEYS, ge=1, le=10_000, description="live (unrevoked) API keys"
    )


class QuotasPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_agents: int | None = Field(default=None, ge=0, le=100_000)
    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    tokens_per_day: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=0, le=100_000)
    max_cores: float | None = Field(default=None, ge=0, le=1_000_000)
    max_sessions: int | None = Field(default=None, ge=0, le=10_000_000)
    max_keys: int | None = Field(default=None, ge=1, le=10_000)


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    quotas: Quotas = Field(default_factory=Quotas)


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quotas: QuotasPatch


class SpawnRequest(BaseModel):
    """An agent from resources and a model at the top level (``AgentSpec`` nests them)."""

    model_config = ConfigDict(extra="forbid")

    anthropic_api_key: SecretStr | None = None
    cores: float = Field(default=1.0, ge=0, le=256)
    memory: int = Field(default=1024, ge=64, le=1_048_576, description="MiB")
    gpus: float = Field(default=0.0, ge=0, le=16)
    model: str = Field(default="claude-sonnet-5-5", min_length=1, max_length=128)
    system: str = Field(default="", max_length=200_000)
    tools: tuple[str, ...] = ()

    def to_spec(self) -> AgentSpec:
        return AgentSpec(
            model=self.model,
            system=self.system,
            tools=self.tools,
            resources=Resources(cores=self.cores, memory_mb=self.memory, gpus=self.gpus),
            anthropic_api_key=self.anthropic_api_key,
        )


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str | list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    if_busy: Literal["reject", "enqueue", "interrupt"] = Field(
        default="reject",
        description="when a turn is running: reject (409 session_busy), enqueue (wait, in "
        "order, behind at most the agent's max_queued_turns; beyond, 429), or interrupt (the "
        "running turn stops and commits as interrupted; this one runs next)",
    )
    background: bool = Field(
        default=False,
        description="202 at once with the turn's id; it runs with no client attached (follow it "
        "with GET /v1/sessions/{id}/events or /turns/{turn_id})",
    )

    @model_validator(mode="after")
    def _one_way_to_answer(self) -> MessageIn:
        if self.background and self.stream:
            raise ValueError(
                "a background turn is not streamed here: follow it with "
                "GET /v1/sessions/{session_id}/events"
            )
        return self

    def checked_content(self) -> str | list[dict[str, Any]]:
        if isinstance(self.content, str) and len(self.content) > MAX_MESSAGE_CHARS:
            from .errors import ApiError

            raise ApiError(
                413, "message_too_large", f"the message is over {MAX_MESSAGE_CHARS} characters"
            )
        return self.content
