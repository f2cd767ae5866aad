"""What the control store answers with: users, keys, agents, session routes, usage, admissions.

Frozen dataclasses, so the control-store actor returns them across Ray as themselves and mypy
checks every reader. The HTTP layer turns them into JSON (``app.py``); pydantic stays at that edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hyperfleet.metering import Reservation

from .ratelimit import Decision

# A quota not set on a user takes these (the API's ``Quotas`` model has the same defaults).
DEFAULT_MAX_AGENTS = 50
DEFAULT_REQUESTS_PER_MINUTE = 100
DEFAULT_MAX_REPLICAS = 50  # replicas of all of a user's agents (each agent runs at least one)
DEFAULT_MAX_CORES = 50.0  # cores of all of a user's replicas
DEFAULT_MAX_SESSIONS = 1_000  # open sessions of all of a user's agents
DEFAULT_MAX_KEYS = 10  # live (unrevoked) API keys


@dataclass(frozen=True)
class User:
    """A tenant. ``quotas`` is as it was set (the admin's may be empty, and an API user's has every
    field); read it through the properties. ``key_prefix`` is the key that authenticated it."""

    id: str
    name: str
    is_admin: bool
    quotas: dict[str, Any]
    created_at: float
    key_prefix: str | None = None

    @property
    def max_agents(self) -> int:
        return int(self.quotas.get("max_agents", DEFAULT_MAX_AGENTS))

    @property
    def requests_per_minute(self) -> int:
        return int(self.quotas.get("requests_per_minute", DEFAULT_REQUESTS_PER_MINUTE))

    @property
    def max_replicas(self) -> int:
        return int(self.quotas.get("max_replicas", DEFAULT_MAX_REPLICAS))

    @property
    def max_cores(self) -> float:
        return float(self.quotas.get("max_cores", DEFAULT_MAX_CORES))

    @property
    def max_sessions(self) -> int:
        return int(self.quotas.get("max_sessions", DEFAULT_MAX_SESSIONS))

    @property
    def max_keys(self) -> int:
        return int(self.quotas.get("max_keys", DEFAULT_MAX_KEYS))

    @property
    def tokens_per_day(self) -> int | None:
        """The daily token budget, or None: no budget (no turn reserves anything)."""
        budget = self.quotas.get("tokens_per_day")
        return None if budget is None else int(budget)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "quotas": self.quotas,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class IssuedKey:
    """A new API key: its plaintext is here once, and never stored."""

    prefix: str
    api_key: str


@dataclass(frozen=True)
class Agent:
    id: str
    owner: str
    # The AgentSpec's JSON, an Anthropic key of its own "redacted" (sealing.py): never shown as
    # is, nor in a repr that a log line or a traceback would print.
    spec: str = field(repr=False)
    status: str  # starting, ready, pending, draining or deleted
    replicas: int
    created_at: float


@dataclass(frozen=True)
class Route:
    """Where a session lives: its agent's replica ``replica``; ``max_tokens`` is the agent's, what
    each of the session's turns reserves."""

    id: str
    agent_id: str
    owner: str
    replica: int
    created_at: float
    max_tokens: int


@dataclass(frozen=True)
class ReplicaRow:
    """One replica of an agent's pool. ``state``: ``starting`` (asked of Ray, not yet
    answering), ``ready`` (takes sessions), ``draining`` (being removed: takes no new session
    or turn, finishes its turns by ``deadline``, then its sessions move and it stops)."""

    agent_id: str
    index: int
    state: str
    created_at: float
    changed_at: float
    deadline: float | None = None


@dataclass(frozen=True)
class PoolRow:
    """An agent pool's last scaling decision and the policy's state (``PoolState`` as JSON),
    kept so that a restarted controller keeps its cooldowns and trend."""

    agent_id: str
    desired: int
    reason: str
    state: str = field(repr=False)
    updated_at: float


@dataclass(frozen=True)
class PoolAgent:
    """What the pool controller needs of an agent: its owner, its spec (a key of its own
    opened: the controller starts its replicas) and its replicas."""

    id: str
    owner: str
    spec: str = field(repr=False)
    replicas: tuple[ReplicaRow, ...]
    pool: PoolRow | None


@dataclass(frozen=True)
class UsageRow:
    """A user's tokens and cost for one agent on one UTC day."""

    agent_id: str
    day: str
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    cost_usd: float
    turns: int


@dataclass(frozen=True)
class Admission:
    """A request's admission: the caller (None for a missing, unknown or revoked key) and the
    decision of the last window checked. For a turn, also the session's route (None when unknown
    or not the caller's) and, when the user has a daily budget, the turn's reservation, or why the
    budget refused it. A refused turn still counts in the windows."""

    user: User | None
    decision: Decision
    route: Route | None = None
    reservation: Reservation | None = None
    over_budget: str | None = None  # why the budget refused the turn (a 403), else None


def over_budget(tokens: int, used: int, reserved: int, tokens_per_day: int) -> str:
    """What a turn the daily budget refuses is told (by either gate)."""
    return (
        f"this turn may use {tokens} tokens; {used} used and {reserved} reserved "
        f"today of your {tokens_per_day} tokens per day"
    )
