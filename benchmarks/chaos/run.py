"""One chaos run against a running API: a tenant made for it, the load tester's virtual users
(half streaming, half JSON; every message with an idempotency key, retried as a good client
does) writing the history, the fault schedule injected meanwhile, then every session resumed and
read back, the control store's metering read, and the checker's report.

Each virtual user keeps one session for the whole run (``Load(close_sessions=False)``): the
read-back resumes it with one more message, so "resumable" means a session that went through
the faults still takes a turn. The tenant's agent starts with ``min_replicas`` replicas, so a
replica's fault disturbs only the sessions it holds.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from cluster.loadtest.tenant import provision, release
from cluster.loadtest.users import Live, Load, Plan, Target

from .checker import BudgetState, FinalState, MeterState, Report, SessionState, check
from .faults import InjectionError, Injector
from .history import Fault, History
from .readback import Reader, read_meter
from .schedule import Planned

REQUEST_TIMEOUT_S = 120.0  # a paused replica's requests wait for it
READ_CONCURRENCY = 16
REQUESTS_PER_SESSION = 1_000_000  # a session lasts the whole run
READY_WAIT_S = 60.0
READY_POLL_S = 0.5
SETTLED_S = 3.0  # the metered tokens unchanged this long: the run's turns have all been metered
QUOTA_CACHE_S = 2.5  # ingress replicas re-read a user's quotas within 2 s (AUTH_CACHE_TTL_S)


@dataclass(frozen=True)
class ChaosPlan:
    """The workload's shape: ``users`` sessions (half of them streaming) for ``duration_s``."""

    seed: int = 0
    users: int = 12
    duration_s: float = 120.0
    think_time_s: float = 0.5
    max_retries: int = 10
    min_replicas: int = 2
    meter_wait_s: float = 100.0  # the stack sweeps its outbox every 30 s after a 60 s grace
    # A day's token budget for the run's user, to run out during the run (None: no budget).
    # It is lifted before the read-back, so that every session can take its new message.
    budget_tokens: int | None = None

    def load_plans(self) -> list[Plan]:
        streamed = max(1, self.users // 2)
        shares = [(streamed, True), (self.users - streamed, False)]
        return [
            Plan(
                users=n,
                requests=REQUESTS_PER_SESSION,
                think_time_s=self.think_time_s,
                duration_s=self.duration_s,
                stream=stream,
                timeout_s=REQUEST_TIMEOUT_S,
                max_retries=self.max_retries,
                seed=self.seed * 2 + stream,
            )
            for n, stream in shares
            if n > 0
        ]


@dataclass(frozen=True)
class Control:
    """Where the run reads what was metered: the control store's SQLite file."""

    db: Path


async def _at(start: float, planned: Planned, injector: Injector) -> Fault | None:
    delay = start + planned.at_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        return await injector.inject(planned.kind)
    except InjectionError as e:
        print(f"chaos: {planned.kind} at {planned.at_s:g} s not injected: {e}", file=sys.stderr)
        return None


async def run_chaos(
    base_url: str,
    admin_key: str,
    plan: ChaosPlan,
    schedule: Sequence[Planned],
    make_injector: Callable[[History, Target], Injector],
    history: History,
    control: Control | None,
    run_id: str,
) -> Report:
    """The run, start to finish; the tenant it made is removed afterwards, whatever happened.
    ``make_injector`` is given the history its faults go into and the tenant's target (whose
    agent's replicas are the ones to hit)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sizing = Plan(users=plan.users, requests=1)
        tenant = await provision(
            http, base_url, admin_key, sizing, None, run_id, min_replicas=plan.min_replicas
        )
        try:
            await _replicas_ready(http, tenant.target, plan.min_replicas)
            injector = make_injector(history, tenant.target)
            user_id = tenant.created_user_id

            async def set_budget(tokens: int | None) -> None:
                if user_id is None:
                    raise RuntimeError("a budget needs the run to make its own user (an admin key)")
                await _set_budget(http, base_url, admin_key, user_id, tokens)

            if plan.budget_tokens is not None:
                await set_budget(plan.budget_tokens)
            return await _run(
                http,
                tenant.target,
                user_id,
                plan,
                schedule,
                injector,
                history,
                control,
                run_id,
                set_budget,
            )
        finally:
            problems = await release(http, base_url, admin_key, tenant)
            for problem in problems:
                print(f"chaos: cleanup: {problem}", file=sys.stderr)


async def _set_budget(
    http: aiohttp.ClientSession, base_url: str, admin_key: str, user_id: str, tokens: int | None
) -> None:
    """Sets (or with None lifts) the user's ``tokens_per_day``, and waits out the ingress
    replicas' quota caches."""
    async with http.patch(
        f"{base_url}/v1/users/{user_id}",
        json={"quotas": {"tokens_per_day": tokens}},
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=aiohttp.ClientTimeout(30),
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"setting the budget: {response.status} {await response.text()}")
    await asyncio.sleep(QUOTA_CACHE_S)


async def _replicas_ready(http: aiohttp.ClientSession, target: Target, count: int) -> None:
    """Waits (``READY_WAIT_S`` at most) until the agent has ``count`` ready replicas, so that
    its sessions spread over them from the start."""
    deadline = time.monotonic() + READY_WAIT_S
    url = f"{target.base_url}/v1/agents/{target.agent_id}"
    headers = {"Authorization": f"Bearer {target.api_key}"}
    while time.monotonic() < deadline:
        async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(10)) as response:
            agent = await response.json(content_type=None) if response.status == 200 else {}
        ready = [r for r in agent.get("replicas") or [] if r.get("state") == "ready"]
        if len(ready) >= count:
            return
        await asyncio.sleep(READY_POLL_S)
    print(f"chaos: fewer than {count} replicas ready after {READY_WAIT_S:g} s", file=sys.stderr)


async def _run(
    http: aiohttp.ClientSession,
    target: Target,
    user_id: str | None,
    plan: ChaosPlan,
    schedule: Sequence[Planned],
    injector: Injector,
    history: History,
    control: Control | None,
    run_id: str,
    set_budget: Callable[[int | None], Awaitable[None]] | None = None,
) -> Report:
    observe = history.observer(time.perf_counter)  # the loads' clock
    loads = [
        Load(
            http, target, load_plan, f"{run_id}-{n}", Live(), observe=observe, close_sessions=False
        )
        for n, load_plan in enumerate(plan.load_plans())
    ]
    since = time.time()
    start = time.monotonic()
    faults = [asyncio.create_task(_at(start, p, injector)) for p in schedule]
    try:
        await asyncio.gather(*(load.run() for load in loads))
        await asyncio.gather(*faults)
    finally:
        for task in faults:
            task.cancel()
    spent: BudgetState | None = None
    if plan.budget_tokens is not None and set_budget is not None:
        if control is None or user_id is None:
            raise RuntimeError("a budget check reads the control store's metering")
        acked = {str(r.turn_id) for r in history.requests() if r.acked}
        used = await asyncio.to_thread(
            _settled_usage, control.db, user_id, target.agent_id, since, acked, plan.meter_wait_s
        )
        spent = BudgetState(plan.budget_tokens, used, plan.users)
        await set_budget(None)
    sessions = sorted(
        {str(r.session_id) for r in history.requests() if r.op == "open" and r.session_id}
    )
    reader = Reader(http, target.base_url, target.api_key, history)
    limit = asyncio.Semaphore(READ_CONCURRENCY)

    async def read(session_id: str) -> tuple[str, SessionState]:
        async with limit:
            return session_id, await reader.session(session_id, run_id)

    states = dict(await asyncio.gather(*(read(s) for s in sessions)))
    meter: MeterState | None = None
    if control is not None and user_id is not None:
        committed = {t.turn_id for s in states.values() for t in s.turns or ()}
        meter = await asyncio.to_thread(
            read_meter, control.db, user_id, target.agent_id, since, committed, plan.meter_wait_s
        )
    return check(history.requests(), history.faults(), FinalState(states, meter, spent))


def _settled_usage(
    db: Path, user_id: str, agent_id: str, since: float, acked: set[str], wait_s: float
) -> int:
    """The user's metered tokens once every acknowledged turn's final record is in and the
    total has stopped moving for ``SETTLED_S`` (the failed turns' records come too), or after
    ``wait_s``."""
    deadline = time.monotonic() + wait_s
    state = read_meter(db, user_id, agent_id, since, acked, wait_s)
    last, still_since = state.usage_tokens, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - still_since < SETTLED_S:
        time.sleep(0.5)
        now = read_meter(db, user_id, agent_id, since, set(), 0).usage_tokens
        if now != last:
            last, still_since = now, time.monotonic()
    return last
