"""One path's measured window at one client count, and the table and reading of a
``benchmarks.peer_litellm`` run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.local_stack import Sampler
from benchmarks.peer_load import Window
from cluster.loadtest.report import percentile

LITELLM_ROLE = "litellm proxy"
EMULATOR_ROLE = "emulator"
LABELS = {"direct": "(a) emulator", "litellm": "(b) LiteLLM", "hyperfleet": "(c) Hyperfleet"}
LAG_WARN_MS = 50.0  # hyperfleet loadtest's own threshold
TOP_ROLES = 5


@dataclass
class PathResult:
    path: str
    clients: int
    requests: int
    failed: int
    open_failures: int
    wall_s: float
    p50_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None
    output_tokens_by_turn: dict[int, float]  # mean, by the turn's place in its conversation
    cpu_s: dict[str, float]  # by role over the window: every sampled process's
    idle_cpu_per_s: dict[str, float]
    client_cpu_s: float
    client_lag_p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls, path: str, clients: int, window: Window, sampler: Sampler, idle: dict[str, float]
    ) -> PathResult:
        ok = [t for t in window.turns if t.ok]
        e2e = [1000.0 * (t.end - t.start) for t in ok]
        ttft = [1000.0 * t.ttft_s for t in ok if t.ttft_s is not None]
        errors = Counter(t.error.split(":")[0] for t in window.turns if not t.ok)
        tokens: dict[int, list[int]] = {}
        for t in ok:
            tokens.setdefault(t.index, []).append(t.output_tokens)
        return cls(
            path=path,
            clients=clients,
            requests=len(ok),
            failed=len(window.turns) - len(ok),
            open_failures=window.open_failures,
            wall_s=sampler.wall_s(),
            p50_ms=percentile(e2e, 50),
            p99_ms=percentile(e2e, 99),
            ttft_p50_ms=percentile(ttft, 50),
            output_tokens_by_turn={i: sum(n) / len(n) for i, n in sorted(tokens.items())},
            cpu_s=sampler.cpu_s(),
            idle_cpu_per_s=idle,
            # The sampler's thread runs in the load generator's process: not the load's.
            client_cpu_s=max(0.0, window.client_cpu_s - sampler.own_cpu_s),
            client_lag_p99_ms=window.client_lag_p99_ms,
            errors=dict(errors),
        )

    @property
    def label(self) -> str:
        return LABELS.get(self.path, self.path)

    @property
    def req_per_s(self) -> float:
        return self.requests / max(self.wall_s, 1e-9)

    def roles(self) -> list[str]:
        """The roles of the processes this path's requests go through."""
        if self.path == "direct":
            return [EMULATOR_ROLE]
        if self.path == "litellm":
            return [EMULATOR_ROLE, LITELLM_ROLE]
        return [role for role in self.cpu_s if role != LITELLM_ROLE]

    def cpu_ms(self, net: bool = True) -> dict[str, float]:
        """CPU ms per request by role (net: less the role's idle CPU over the window), largest
        first."""
        per = {}
        for role in self.roles():
            spent_s = self.cpu_s.get(role, 0.0)
            if net:
                spent_s -= self.idle_cpu_per_s.get(role, 0.0) * self.wall_s
            per[role] = 1000.0 * spent_s / max(self.requests, 1)
        return dict(sorted(per.items(), key=lambda kv: -kv[1]))

    def total_ms(self, net: bool = True) -> float:
        return sum(self.cpu_ms(net).values())

    def client_ms(self) -> float:
        return 1000.0 * self.client_cpu_s / max(self.requests, 1)


def base_of(result: PathResult, results: Sequence[PathResult]) -> PathResult | None:
    """(a) at the same client count."""
    return next((r for r in results if r.path == "direct" and r.clients == result.clients), None)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _added(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{value - base:+.0f}"


def table(rows: Sequence[PathResult], results: Sequence[PathResult]) -> str:
    """``rows`` as a Markdown table; the "added" and "over (a)" columns from ``results``."""
    lines = [
        "| clients | path | requests | failed | req/s | p50 ms | p99 ms | TTFT p50 ms "
        "| added p50 / p99 ms | CPU ms/req net (gross) | over (a) | by process, ms/req "
        "| load generator ms/req, lag p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        base = base_of(r, results)
        added = (
            "-"
            if base is None or r is base
            else f"{_added(r.p50_ms, base.p50_ms)} / {_added(r.p99_ms, base.p99_ms)}"
        )
        over = "-" if base is None or r is base else f"{r.total_ms() - base.total_ms():+.1f}"
        by_role = ", ".join(f"{role} {ms:.1f}" for role, ms in list(r.cpu_ms().items())[:TOP_ROLES])
        failed = r.failed + r.open_failures
        errors = f" ({', '.join(f'{e} x{n}' for e, n in r.errors.items())})" if r.errors else ""
        lines.append(
            f"| {r.clients} | {r.label} | {r.requests} | {failed}{errors} | {r.req_per_s:.1f} "
            f"| {_ms(r.p50_ms)} | {_ms(r.p99_ms)} | {_ms(r.ttft_p50_ms)} | {added} "
            f"| {r.total_ms():.1f} ({r.total_ms(net=False):.1f}) | {over} | {by_role} "
            f"| {r.client_ms():.1f}, {r.client_lag_p99_ms:.0f} |"
        )
    return "\n".join(lines)


def _differ(answers: Sequence[dict[int, float]]) -> bool:
    """Whether paths got answers of different lengths at a turn (of those each measured)."""
    turns = {turn for a in answers for turn in a}
    return any(len({round(a[t]) for a in answers if t in a}) > 1 for t in turns)


def reading(results: Sequence[PathResult]) -> str:
    """What the table says, a sentence per client count, and its caveats."""
    said = []
    for clients in dict.fromkeys(r.clients for r in results):
        at = {r.path: r for r in results if r.clients == clients}
        base, peer, ours = at.get("direct"), at.get("litellm"), at.get("hyperfleet")
        if base is None or peer is None or ours is None:
            continue
        peer_cpu = peer.total_ms() - base.total_ms()
        ours_cpu = ours.total_ms() - base.total_ms()
        ratio = f"{ours_cpu / peer_cpu:.1f} times" if peer_cpu > 0 else "n/a"
        said.append(
            f"At {clients} clients LiteLLM adds {_added(peer.p50_ms, base.p50_ms)} ms at p50 "
            f"({_added(peer.p99_ms, base.p99_ms)} ms at p99) and {peer_cpu:.1f} CPU ms a request "
            f"over the emulator alone; Hyperfleet adds {_added(ours.p50_ms, base.p50_ms)} ms "
            f"({_added(ours.p99_ms, base.p99_ms)} ms) and {ours_cpu:.1f} CPU ms, {ratio} "
            f"LiteLLM's CPU."
        )
        answers = {r.label: r.output_tokens_by_turn for r in at.values()}
        if not _differ(list(answers.values())):
            said.append("The three paths got the same answers, turn by turn.")
        else:
            said.append(
                f"The paths' answers differ at {clients} clients (mean output tokens by turn: "
                f"{'; '.join(f'{k} {v}' for k, v in answers.items())}): their latencies are not "
                f"of the same work."
            )
    lagging = sorted({(r.clients, r.label) for r in results if r.client_lag_p99_ms > LAG_WARN_MS})
    if lagging:
        said.append(
            f"The load generator's event loop lagged past {LAG_WARN_MS:.0f} ms (p99) on "
            f"{', '.join(f'{label} at {n} clients' for n, label in lagging)}: it shares the "
            f"cores, and those latencies include its own delay."
        )
    return " ".join(said)
