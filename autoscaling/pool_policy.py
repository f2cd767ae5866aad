"""The agent pool's scaling decision: a pure function of the policy, the pool's state, one
observation and the clock.

``decide(policy, state, observation, now) -> Decision`` is the whole policy; the pool controller
(``pool.py``) observes and acts, the simulation (``benchmarks/autoscale_sim.py``) replays traces
through the same function, and the unit tests sweep it. Written in the manner of Ray Serve's
``autoscaling_policy.py``: explicit state in, explicit state out, no clock of its own.

The policy (ARCHITECTURE.md, "Scaling: two loops"):

- Utilisation is demand over capacity: the agent's sessions (never fewer than its turns in
  flight, plus the sessions just refused) over (replicas counted x ``max_sessions``). Replicas
  counted are the ready and the starting ones: a replica on its way is capacity already asked
  for, so a tick does not ask again while it starts (a draining replica is leaving and does not
  count).
- Up: above ``scale_up_at`` (now, or projected over the time a new replica takes to be ready),
  desired becomes the fewest replicas that bring demand back under ``scale_up_at``. Aggressive
  when sessions are being refused, when utilisation is at or above ``panic_at``, or when the
  projection outruns the threshold: then at least double, bounded by ``max_step``. The up
  cooldown (``scale_up_cooldown_s``) spaces scale-ups while new replicas start; refusals skip it,
  since a refused session is a failure a client sees. A refusal while replicas are starting
  sizes the target (it is demand) but neither skips the cooldown nor doubles: else each tick of
  a VM's start would double the pool again (the simulation went 29 -> 58 -> 108 replicas in
  2 s for a burst that needed 39). ``pool.py`` also waits for starting replicas instead of
  reporting such a refusal at all.
- Down: only after utilisation (now and projected) has stayed below ``scale_down_at`` for a whole
  ``scale_down_cooldown_s``, and never within ``scale_down_cooldown_s`` of a scale-up. One step
  at a time: to the replicas that put demand at ``settle_at`` (the band's middle), removing at
  most ``down_step`` of them (a fraction of the pool, at least one). Landing in the middle of the
  band, not at its edge, is the hysteresis: a step down cannot cross ``scale_up_at`` by itself.
  Half the pool at most: one step reaches ``settle_at`` from anywhere above 27.5 %. The step
  aims at the projection as well as the demand, so a pool is not stepped to zero while a
  session is on its way. A quarter, the earlier default,
  lands a pool stepping down from under 30 % near 40 %, inside the band, where it stays: 40.5
  replica-hours against 36.2 on ``benchmarks/autoscale_sim.py``'s Azure-layout hour, 609
  against 594 on its day.
- Trend: the least-squares slope of demand over the last ``trend_window_s`` of observations,
  projected ``lead_time_s`` ahead (the measured time to a ready replica: ~0.35 s on a warm node,
  ~8 s when a VM must be added). Only a rising trend adds capacity early; a falling one only
  delays nothing, because down already waits a whole cooldown.
- Bounds: ``min_replicas <= desired <= max_replicas`` always; below min, up to min and past
  it if demand needs more (a full pool that lost a replica). The fleet's cap and the owner's
  quota are applied where replicas are allocated (the control store), where every agent's
  count is known at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

TREND_SAMPLES_MAX = 120  # observations kept for the trend (a tick every 2 s: four minutes)


@dataclass(frozen=True)
class PoolPolicy:
    """One agent's scaling parameters (its spec's ``replicas`` block, the operator's defaults
    filling what it leaves out)."""

    min_replicas: int = 1
    max_replicas: int = 1
    max_sessions: int = 100
    scale_up_at: float = 0.8
    scale_down_at: float = 0.3
    scale_up_cooldown_s: float = 15.0
    scale_down_cooldown_s: float = 300.0
    panic_at: float = 0.95
    max_step: int = 50  # the most replicas one aggressive step adds
    down_step: float = 0.5  # the largest share of the pool one step down removes
    trend_window_s: float = 120.0
    lead_time_s: float = 8.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"replicas: need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas})"
            )
        if not 0 < self.scale_down_at < self.scale_up_at <= 1:
            raise ValueError(
                f"thresholds: need 0 < scale_down_at ({self.scale_down_at}) < scale_up_at "
                f"({self.scale_up_at}) <= 1"
            )
        if self.max_sessions < 1 or self.max_step < 1 or not 0 < self.down_step <= 1:
            raise ValueError("max_sessions and max_step must be >= 1, down_step in (0, 1]")

    @property
    def settle_at(self) -> float:
        """Where a step down aims: the middle of the band."""
        return (self.scale_up_at + self.scale_down_at) / 2


@dataclass(frozen=True)
class Observation:
    """One look at an agent's pool."""

    sessions: int  # sessions hosted by its replicas
    busy: int = 0  # turns in flight
    refused: int = 0  # sessions refused for capacity since the last observation
    ready: int = 0
    starting: int = 0
    draining: int = 0

    @property
    def counted(self) -> int:
        """The replicas that count as capacity: ready, and starting."""
        return self.ready + self.starting

    @property
    def demand(self) -> int:
        """Sessions wanting a place: those hosted (never fewer than the turns in flight), and
        those just refused for want of one."""
        return max(self.sessions, self.busy) + self.refused


@dataclass(frozen=True)
class PoolState:
    """What ``decide`` remembers between ticks; the controller stores it durably, so a restart
    keeps the cooldowns and the trend."""

    desired: int | None = None
    last_up_at: float | None = None
    last_down_at: float | None = None
    below_since: float | None = None  # when utilisation went below scale_down_at; None: not below
    samples: tuple[tuple[float, int], ...] = field(default=())  # (time, demand), oldest first

    def to_json(self) -> dict[str, object]:
        return {
            "desired": self.desired,
            "last_up_at": self.last_up_at,
            "last_down_at": self.last_down_at,
            "below_since": self.below_since,
            "samples": [list(s) for s in self.samples],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PoolState:
        samples = data.get("samples") or []
        assert isinstance(samples, list)
        return cls(
            desired=_opt_int(data.get("desired")),
            last_up_at=_opt_float(data.get("last_up_at")),
            last_down_at=_opt_float(data.get("last_down_at")),
            below_since=_opt_float(data.get("below_since")),
            samples=tuple((float(t), int(d)) for t, d in samples),
        )


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # one of REASONS
    state: PoolState
    counted: int  # the replicas the observation counted (ready and starting)

    @property
    def delta(self) -> int:
        """Replicas to add (positive) or remove (negative)."""
        return self.desired - self.counted


# Why a pool is at its size, for the API and the ``hyperfleet_pool_decisions_total`` metric.
REASONS = (
    "below_min",
    "above_max",
    "at_max",
    "at_min",
    "up_cooldown",
    "down_cooldown",
    "utilisation",
    "trend",
    "panic",
    "surge",
    "refused",
    "utilisation_low",
    "steady",
)


def trend_per_s(samples: tuple[tuple[float, int], ...]) -> float:
    """The least-squares slope of demand over time (sessions per second); 0 with fewer than
    three samples or no spread in time."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_d = sum(d for _, d in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread <= 0:
        return 0.0
    return sum((t - mean_t) * (d - mean_d) for t, d in samples) / spread


def replicas_for(demand: float, max_sessions: int, utilisation: float) -> int:
    """The fewest replicas that hold ``demand`` at or under ``utilisation``."""
    if demand <= 0:
        return 0
    # A hair of tolerance: 80 sessions over 100 at 0.8 is exactly at the threshold, not over.
    return math.ceil(demand / (max_sessions * utilisation) - 1e-9)


def decide(policy: PoolPolicy, state: PoolState, seen: Observation, now: float) -> Decision:
    """The desired replica count, why, and the state to keep. Pure: same inputs, same answer."""
    samples = _window((*state.samples, (now, seen.demand)), now, policy.trend_window_s)
    state = replace(state, samples=samples)
    counted = seen.counted
    capacity = counted * policy.max_sessions
    demand = seen.demand
    projected = demand + max(0.0, trend_per_s(samples)) * policy.lead_time_s
    util = demand / capacity if capacity else (math.inf if demand else 0.0)
    util_ahead = projected / capacity if capacity else (math.inf if projected else 0.0)

    def result(desired: int, reason: str, new_state: PoolState) -> Decision:
        desired = min(max(desired, policy.min_replicas), policy.max_replicas)
        return Decision(desired, reason, replace(new_state, desired=desired), counted)

    if counted < policy.min_replicas:
        # Back to min, and past it if demand needs more (a full pool that lost a replica).
        needed = replicas_for(max(demand, projected), policy.max_sessions, policy.scale_up_at)
        up = replace(state, last_up_at=now, below_since=None)
        return result(max(policy.min_replicas, needed), "below_min", up)
    if counted > policy.max_replicas:
        return result(policy.max_replicas, "above_max", replace(state, last_down_at=now))

    # A refusal while replicas are starting is already being answered: it sizes the target
    # (it is in demand) but neither skips the cooldown nor doubles again, or a burst would
    # double the pool on every tick of a VM's start.
    refusing = seen.refused > 0 and seen.starting == 0
    if refusing or util > policy.scale_up_at or util_ahead > policy.scale_up_at:
        state = replace(state, below_since=None)
        if counted >= policy.max_replicas:
            return result(counted, "at_max", state)
        since_up = math.inf if state.last_up_at is None else now - state.last_up_at
        if since_up < policy.scale_up_cooldown_s and not refusing:
            return result(counted, "up_cooldown", state)
        target = replicas_for(max(demand, projected), policy.max_sessions, policy.scale_up_at)
        reason = "utilisation" if util > policy.scale_up_at else "trend"
        if (
            refusing
            or util >= policy.panic_at
            or (util_ahead > policy.scale_up_at and target > 2 * counted)
        ):
            # Aggressive: at least double (from nothing, at least one), at most max_step more.
            target = max(target, min(max(2 * counted, 1), counted + policy.max_step))
            reason = "refused" if refusing else "panic" if util >= policy.panic_at else "surge"
        target = max(min(target, counted + policy.max_step), counted + 1)
        return result(target, reason, replace(state, last_up_at=now))

    if util < policy.scale_down_at and util_ahead < policy.scale_down_at:
        below_since = state.below_since if state.below_since is not None else now
        state = replace(state, below_since=below_since)
        if counted <= policy.min_replicas:
            return result(counted, "at_min", state)
        since_up = math.inf if state.last_up_at is None else now - state.last_up_at
        cooldown_s = policy.scale_down_cooldown_s
        if now - below_since < cooldown_s or since_up < cooldown_s:
            return result(counted, "down_cooldown", state)
        # The projection too: a pool stepped to zero while a session is on its way would be
        # scaled straight back up.
        settle = replicas_for(max(demand, projected), policy.max_sessions, policy.settle_at)
        step = max(1, math.floor(counted * policy.down_step))
        target = max(settle, counted - step, policy.min_replicas)
        if target >= counted:
            return result(counted, "steady", state)
        # The next step waits a whole cooldown below the band again.
        return result(target, "utilisation_low", replace(state, last_down_at=now, below_since=None))

    return result(counted, "steady", replace(state, below_since=None))


def _window(
    samples: tuple[tuple[float, int], ...], now: float, window_s: float
) -> tuple[tuple[float, int], ...]:
    kept = tuple(s for s in samples if now - s[0] <= window_s)
    return kept[-TREND_SAMPLES_MAX:]


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
