"""A chaos run's fault schedule, from a seed: each kind once, one at a time, a gap apart (after
the previous one ended), then mixed: two kinds at once, a few seconds apart, until the run's
duration. The same seed gives the same schedule; the run prints it with its seed, so a failure
can be replayed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Planned:
    at_s: float  # since the workload began
    kind: str


def schedule(
    seed: int,
    kinds: Sequence[str],
    duration_s: float,
    gap_s: float,
    lasts_s: Mapping[str, float] | None = None,
) -> list[Planned]:
    """Faults of ``kinds`` to inject over ``duration_s``; ``lasts_s`` is how long a kind runs
    (a pause, an outage; an instant kill by default), so that the next starts after it."""
    rng = random.Random(seed)
    lasts = dict(lasts_s or {})
    plan: list[Planned] = []
    at = gap_s
    for kind in kinds:
        if at >= duration_s:
            return plan
        plan.append(Planned(round(at, 1), kind))
        at += lasts.get(kind, 0.0) + gap_s
    while len(kinds) > 1:
        first, second = rng.sample(list(kinds), 2)
        other = at + rng.uniform(0.0, gap_s / 2)
        if other >= duration_s:
            break
        plan += [Planned(round(at, 1), first), Planned(round(other, 1), second)]
        at = max(at + lasts.get(first, 0.0), other + lasts.get(second, 0.0))
        at += gap_s * rng.uniform(0.75, 1.25)
    return plan


def describe(seed: int, plan: Sequence[Planned]) -> str:
    """The schedule as the run prints it."""
    steps = ", ".join(f"{p.at_s:g}s {p.kind}" for p in plan)
    return f"fault schedule (seed {seed}): {steps or 'none'}"
