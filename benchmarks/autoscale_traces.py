"""The seeded session traces ``benchmarks/autoscale_sim.py`` replays, and their generator.

Nothing can be downloaded here, so both traces are generated, from a seed, and shipped in
``benchmarks/traces/`` (gzip CSV); ``python -m benchmarks.autoscale_traces`` writes them again
and ``--check`` says whether the shipped files still match. The generator draws only from
``random.Random(seed).random()``, whose sequence Python keeps stable across versions (the
module's other distributions are not promised to be), and derives the rest with plain float
arithmetic and ``math``, so a seed gives the same CSV text byte for byte. The gzip wrapper is
written with ``mtime=0``, but the comparison is on the CSV text: zlib builds may compress the
same text to different bytes.

Each trace starts ``WARMUP_S`` before the window the simulation measures, so that the fleet is
in its steady state, holding the sessions of the hour before, when measuring starts.
``demand_replica_s`` is what a trace asks of an oracle: the fewest replicas at every moment.

``diurnal_10k_users.csv.gz`` (``arrival_s,user,length_s``): a day of one region's traffic for
10,000 users. Each user has a weight (lognormal, sigma 0.8) and a Poisson number of sessions
(12 a day on average); each session starts at a time drawn from the day curve (``DAY_CURVE``,
interpolated by the minute, times a lognormal noise per five minutes, sigma 0.12) and lasts a
lognormal time (median 8 min, sigma 1.0, clipped to 5 s .. 4 h). Four sharp bursts are added
on top (``BURSTS``: a scheduled job, a CI fan-out, a demo, an evening batch). ``arrival_s`` is
from midnight (the warm-up's are negative).

``azure_llm_layout.csv.gz`` (``TIMESTAMP,ContextTokens,GeneratedTokens``): the layout of the
public Azure LLM inference trace (``AzureLLMInferenceTrace_conv.csv``), with its timestamp
format (``2023-11-16 18:15:46.6805900``, 100 ns digits) and its measured hour, which starts at
18:15:46.6805900. Requests arrive as a Poisson process per second whose rate drifts over the
hour (15/s, +-25 %), varies every 10 s (gamma, CV 0.22), and jumps in three bursts
(``AZURE_BURSTS``); token counts are lognormal around the public conversation trace's medians
(context ~1,020, generated ~130). A row is one agent session that arrives at ``TIMESTAMP``;
since an agent's context grows as its loop runs, its length follows its tokens:
``ContextTokens / 12.5 + GeneratedTokens / 50`` seconds (a turn adds ~250 tokens of context
in ~20 s; output at 50 tokens/s), so a median session lasts about 85 s.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TRACES_DIR = Path(__file__).resolve().parent / "traces"
SEED = 20261202
WARMUP_S = 900
DAY_S = 86_400

USERS = 10_000
SESSIONS_PER_USER = 12.0
USER_WEIGHT_SIGMA = 0.8
SESSION_MEDIAN_S = 480.0
SESSION_SIGMA = 1.0
SESSION_MIN_S = 5.0
SESSION_MAX_S = 4 * 3600.0  # an agent session's wall-clock budget
NOISE_BIN_S = 300
NOISE_SIGMA = 0.12
# Relative arrival rate at each hour mark (a working day in one region), interpolated between.
DAY_CURVE = (
    0.10, 0.07, 0.05, 0.05, 0.06, 0.10, 0.22, 0.45, 0.75, 0.95, 1.00, 0.92,
    0.70, 0.85, 0.98, 1.00, 0.90, 0.65, 0.45, 0.38, 0.40, 0.35, 0.25, 0.15,
)  # fmt: skip


@dataclass(frozen=True)
class Burst:
    start_s: float
    duration_s: float
    sessions: int
    median_s: float  # the burst's sessions' median length
    sigma: float


BURSTS = (
    Burst(9.5 * 3600, 60, 1200, 300, 0.6),  # a scheduled job, every team at once
    Burst(14 * 3600 + 1200, 30, 2000, 180, 0.5),  # a CI fan-out
    Burst(16.75 * 3600, 120, 1500, 600, 0.8),  # a demo: everyone opens a session
    Burst(19 * 3600, 20, 600, 600, 0.8),  # an evening batch
)

AZURE_EPOCH = (2023, 11, 16)
AZURE_START_TICKS = ((18 * 60 + 15) * 60 + 46) * 10**7 + 6_805_900  # 18:15:46.6805900
AZURE_HOUR_S = 3600
AZURE_RATE_PER_S = 15.0
AZURE_DRIFT = 0.25
AZURE_JITTER_BIN_S = 10
AZURE_JITTER_SHAPE = 20  # gamma shape: CV 1/sqrt(20) = 0.22
AZURE_CONTEXT = (1020.0, 0.8, 8, 16_000)  # median, sigma, min, max
AZURE_GENERATED = (130.0, 0.9, 1, 2_000)
AZURE_BURSTS = ((1200, 30, 5.0), (2460, 90, 3.0), (3480, 15, 8.0))  # (start_s, s, rate x)
CONTEXT_TOKENS_PER_S = 12.5
GENERATED_TOKENS_PER_S = 50.0
TICKS_PER_S = 10**7


@dataclass(frozen=True)
class Trace:
    """Sessions to replay: arrival times (seconds, sorted; the measured window is
    ``[0, end_s)``, arrivals from ``start_s`` on warm the fleet up) and lengths."""

    name: str
    arrivals_s: tuple[float, ...]
    lengths_s: tuple[float, ...]
    start_s: float
    end_s: float


def _normal(rng: random.Random) -> float:
    # Box-Muller on random() alone (gauss() and normalvariate() are not promised to be stable).
    u1 = 1.0 - rng.random()
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * rng.random())


def lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(sigma * _normal(rng))


def _poisson(rng: random.Random, mean: float) -> int:
    """Inverse transform; exact enough for the means used here (< 700)."""
    u = rng.random()
    k, p = 0, math.exp(-mean)
    total = p
    while u > total and p > 0:
        k += 1
        p *= mean / k
        total += p
    return k


def _day_weight(minute: float) -> float:
    hour = (minute / 60.0) % 24
    low = int(hour)
    frac = hour - low
    return DAY_CURVE[low] * (1 - frac) + DAY_CURVE[(low + 1) % 24] * frac


def diurnal_csv(seed: int = SEED) -> str:
    """The diurnal day's CSV text."""
    rng = random.Random(seed)
    first_min = -WARMUP_S // 60
    minutes = range(first_min, DAY_S // 60)
    noise = [lognormal(rng, 1.0, NOISE_SIGMA) for _ in range((WARMUP_S + DAY_S) // NOISE_BIN_S + 1)]
    cdf: list[float] = []
    total = 0.0
    for m in minutes:
        total += _day_weight(m + 0.5) * noise[(m - first_min) * 60 // NOISE_BIN_S]
        cdf.append(total)

    def arrival() -> float:
        i = bisect.bisect_left(cdf, rng.random() * total)
        return (first_min + min(i, len(cdf) - 1) + rng.random()) * 60.0

    def length(median: float, sigma: float) -> float:
        return min(max(lognormal(rng, median, sigma), SESSION_MIN_S), SESSION_MAX_S)

    mean_weight = math.exp(USER_WEIGHT_SIGMA**2 / 2)
    rows: list[tuple[float, int, float]] = []
    for user in range(USERS):
        weight = lognormal(rng, 1.0, USER_WEIGHT_SIGMA) / mean_weight
        for _ in range(_poisson(rng, SESSIONS_PER_USER * weight)):
            rows.append((arrival(), user, length(SESSION_MEDIAN_S, SESSION_SIGMA)))
    for burst in BURSTS:
        for _ in range(burst.sessions):
            at = burst.start_s + rng.random() * burst.duration_s
            rows.append((at, int(rng.random() * USERS), length(burst.median_s, burst.sigma)))
    rows.sort()
    lines = ["arrival_s,user,length_s"]
    lines.extend(f"{a:.3f},{u},{n:.1f}" for a, u, n in rows)
    return "\n".join(lines) + "\n"


def azure_csv(seed: int = SEED) -> str:
    """The Azure-layout hour's CSV text."""
    rng = random.Random(seed + 1)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    jitter = 1.0
    for second in range(-WARMUP_S, AZURE_HOUR_S):
        if second % AZURE_JITTER_BIN_S == 0:
            exps = sum(-math.log(1.0 - rng.random()) for _ in range(AZURE_JITTER_SHAPE))
            jitter = exps / AZURE_JITTER_SHAPE
        rate = AZURE_RATE_PER_S * jitter
        rate *= 1 + AZURE_DRIFT * math.sin(2 * math.pi * (second + WARMUP_S) / AZURE_HOUR_S)
        for start_s, duration_s, factor in AZURE_BURSTS:
            if start_s <= second < start_s + duration_s:
                rate *= factor
        offsets = sorted(int(rng.random() * TICKS_PER_S) for _ in range(_poisson(rng, rate)))
        for offset in offsets:
            ticks = AZURE_START_TICKS + second * TICKS_PER_S + offset
            context = _tokens(rng, AZURE_CONTEXT)
            generated = _tokens(rng, AZURE_GENERATED)
            lines.append(f"{_timestamp(ticks)},{context},{generated}")
    return "\n".join(lines) + "\n"


def _tokens(rng: random.Random, shape: tuple[float, float, int, int]) -> int:
    median, sigma, low, high = shape
    return min(max(round(lognormal(rng, median, sigma)), low), high)


def _timestamp(ticks: int) -> str:
    seconds, frac = divmod(ticks, TICKS_PER_S)
    minutes, sec = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    year, month, day = AZURE_EPOCH
    return f"{year:04d}-{month:02d}-{day:02d} {hours:02d}:{minute:02d}:{sec:02d}.{frac:07d}"


def session_length_s(context_tokens: int, generated_tokens: int) -> float:
    """How long an Azure-layout row's session holds its slot."""
    seconds = context_tokens / CONTEXT_TOKENS_PER_S + generated_tokens / GENERATED_TOKENS_PER_S
    return max(1.0, seconds)


GENERATORS: dict[str, tuple[str, Callable[[int], str]]] = {
    "diurnal": ("diurnal_10k_users.csv.gz", diurnal_csv),
    "azure": ("azure_llm_layout.csv.gz", azure_csv),
}


def load(name: str, directory: Path = TRACES_DIR) -> Trace:
    """A shipped trace, by name (``diurnal`` or ``azure``)."""
    filename, _ = GENERATORS[name]
    return parse(name, gzip.decompress((directory / filename).read_bytes()).decode())


def parse(name: str, text: str) -> Trace:
    """A trace from its CSV text (either layout, told apart by the header)."""
    header, *rows = text.splitlines()
    pairs: list[tuple[float, float]] = []
    if header == "arrival_s,user,length_s":
        for row in rows:
            arrival, _, length = row.split(",")
            pairs.append((float(arrival), float(length)))
        end_s = float(DAY_S)
    elif header == "TIMESTAMP,ContextTokens,GeneratedTokens":
        for row in rows:
            stamp, context, generated = row.split(",")
            clock = stamp.split(" ")[1]
            hours, minutes, seconds = clock.split(":")
            whole, frac = seconds.split(".")
            ticks = ((int(hours) * 60 + int(minutes)) * 60 + int(whole)) * TICKS_PER_S
            ticks += int(frac.ljust(7, "0"))
            at = (ticks - AZURE_START_TICKS) / TICKS_PER_S
            pairs.append((at, session_length_s(int(context), int(generated))))
        end_s = float(AZURE_HOUR_S)
    else:
        raise ValueError(f"{name}: unknown trace header {header!r}")
    pairs.sort()
    return Trace(
        name=name,
        arrivals_s=tuple(a for a, _ in pairs),
        lengths_s=tuple(n for _, n in pairs),
        start_s=float(-WARMUP_S),
        end_s=end_s,
    )


def demand_replica_s(
    trace: Trace, max_sessions: int, utilisation: float, min_replicas: int = 0
) -> float:
    """Replica-seconds over ``[0, end_s)`` of a fleet that always has the fewest replicas (at
    least ``min_replicas``) holding all of the trace's sessions at or under ``utilisation``: an
    oracle's, that knows the future and starts replicas at once."""
    ends = [a + n for a, n in zip(trace.arrivals_s, trace.lengths_s, strict=True)]
    events = sorted([(a, 1) for a in trace.arrivals_s] + [(e, -1) for e in ends])
    per = max_sessions * utilisation
    demand, last, total = 0, 0.0, 0.0  # departures sort before arrivals at the same instant
    for at, change in [*events, (trace.end_s, 0)]:
        at = min(at, trace.end_s)
        if at > last:
            total += (at - last) * max(min_replicas, math.ceil(demand / per - 1e-9))
            last = at
        demand += change
    return total


def write(directory: Path = TRACES_DIR, seed: int = SEED) -> list[Path]:
    """Generate every trace and write it under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, generate in GENERATORS.values():
        path = directory / filename
        path.write_bytes(gzip.compress(generate(seed).encode(), compresslevel=9, mtime=0))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    if not args.check:
        for path in write(seed=args.seed):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return
    stale = []
    for filename, generate in GENERATORS.values():
        shipped = gzip.decompress((TRACES_DIR / filename).read_bytes()).decode()
        if shipped != generate(args.seed):
            stale.append(filename)
    raise SystemExit(f"stale: {', '.join(stale)}" if stale else 0)


if __name__ == "__main__":
    main()
