"""The baselines ``autoscale_sim`` runs beside Hyperfleet's pool policy: Ray Serve's default
autoscaling policy and Knative's KPA, rebuilt from their sources with their documented defaults,
each fed what the simulated fleet observes (hosted sessions at each second) and answering the
replicas it wants. Benchmark code only: nothing at runtime uses them."""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoscaling import Observation

MAX_SESSIONS = 100  # a replica's sessions, as in the simulation
MIN_REPLICAS = 1
MAX_REPLICAS = 1000


class RayServeController:
    """Ray Serve's default policy (ray 2.60 ``serve/autoscaling_policy.py``:
    ``replica_queue_length_autoscaling_policy``, ``_apply_scaling_factors``,
    ``_apply_delay_logic``) with ``serve/config.py``'s ``AutoscalingConfig`` defaults:
    upscale_delay_s 30, downscale_delay_s 600, look_back_period_s 30, scaling factors 1, mean
    aggregation. A session is an ongoing request, and ``target_ongoing_requests`` is 80 (its
    default, 2, is 40 % of ``max_ongoing_requests``' 5; 80 of 100 is the pool policy's
    ``scale_up_at``). Replicas record every 2 s and push every 10 s
    (``serve/_private/constants.py``), so the controller's window ends at the last push, on
    average ``METRIC_LAG_S`` ago. Its loop runs every 0.1 s; every 2 s here changes its delays
    by under a tick."""

    name = "ray-serve"
    steps_on_refusal = False
    TARGET_ONGOING = 80.0
    UPSCALE_DELAY_S = 30.0
    DOWNSCALE_DELAY_S = 600.0
    LOOK_BACK_S = 30
    METRIC_LAG_S = 5

    def __init__(self) -> None:
        self.target: int | None = None  # the deployment's target_num_replicas
        self.direction = 0
        self.wanted_since = 0.0

    def step(self, seen: Observation, now: float, samples: Sequence[int]) -> int:
        if self.target is None:
            self.target = seen.ready + seen.starting
        end = max(1, len(samples) - self.METRIC_LAG_S)
        window = samples[max(0, end - self.LOOK_BACK_S) : end]
        total = sum(window) / len(window)
        if seen.ready == 0:  # the cold-start path: no running replica to divide by
            desired = max(1, self.target) if total > 0 else self.target
            self.target = min(max(desired, MIN_REPLICAS), MAX_REPLICAS)
            return self.target
        desired = math.ceil(total / self.TARGET_ONGOING)
        direction = (desired > self.target) - (desired < self.target)
        if direction != self.direction:
            self.direction, self.wanted_since = direction, now
        delay_s = self.UPSCALE_DELAY_S if direction > 0 else self.DOWNSCALE_DELAY_S
        if direction and now - self.wanted_since >= delay_s:
            self.target = min(max(desired, MIN_REPLICAS), MAX_REPLICAS)
            self.direction = 0
        return self.target


class KnativeController:
    """Knative's KPA (knative/serving ``pkg/autoscaler/scaling/autoscaler.go``, ``Scale``) with
    ``config/core/configmaps/autoscaler.yaml``'s defaults: stable window 60 s, panic window
    10 % of it, panic threshold 200 %, target 70 % of the container concurrency (a replica's 100
    sessions; 100 is also Knative's default target), max scale-up rate 1000, max scale-down rate
    2, scale-down delay 0, tick 2 s. Scale to zero (30 s grace) never applies: neither trace
    reaches zero and every policy keeps a replica. Not modelled: the activator's buffer, which
    would queue what is refused here."""

    name = "knative"
    steps_on_refusal = False
    STABLE_WINDOW_S = 60
    PANIC_WINDOW_S = 6
    PANIC_THRESHOLD = 2.0
    TARGET = MAX_SESSIONS * 0.7
    MAX_SCALE_UP_RATE = 1000.0
    MAX_SCALE_DOWN_RATE = 2.0

    def __init__(self) -> None:
        self.panic_since: float | None = None
        self.max_panic_pods = 0

    def step(self, seen: Observation, now: float, samples: Sequence[int]) -> int:
        stable = _mean_tail(samples, self.STABLE_WINDOW_S)
        panic = _mean_tail(samples, self.PANIC_WINDOW_S)
        ready = float(max(1, seen.ready))
        max_up = math.ceil(self.MAX_SCALE_UP_RATE * ready)
        max_down = math.floor(ready / self.MAX_SCALE_DOWN_RATE)
        dspc = math.ceil(stable / self.TARGET)
        dppc = math.ceil(panic / self.TARGET)
        desired = min(max(dspc, max_down), max_up)
        if dppc / ready >= self.PANIC_THRESHOLD:
            self.panic_since = now
        elif self.panic_since is not None and self.panic_since + self.STABLE_WINDOW_S < now:
            self.panic_since, self.max_panic_pods = None, 0
        if self.panic_since is not None:  # in panic: the larger of the two, and never down
            desired = max(desired, min(max(dppc, max_down), max_up), self.max_panic_pods)
            self.max_panic_pods = desired
        return min(max(desired, MIN_REPLICAS), MAX_REPLICAS)


def _mean_tail(samples: Sequence[int], n: int) -> float:
    tail = samples[-n:]
    return sum(tail) / len(tail) if tail else 0.0
