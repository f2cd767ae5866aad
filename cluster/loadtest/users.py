"""Virtual users: each opens its own session, sends its messages and closes it, as a client of
the HTTP API would, and records what it saw as ``Outcome``s.

Two ways to apply load:
- closed loop (``--users N``): N users, each sending its next message when its last one is
  answered (after a think time). The load adapts to the server, so overload shows as slower
  answers, never as a queue: coordinated omission hides it.
- open loop (``--rate R``): sessions arrive as a Poisson process at R a second (ramping up
  linearly over ``--ramp-up`` by thinning), whether or not earlier ones were answered, as
  independent users do. Overload then shows as latency growing and errors.

Every message carries an idempotency key, so a resend after a dropped connection joins the
turn still running or returns the committed one instead of running it twice. A good client
resends what the server says may pass (``x-should-retry``, a stream error's ``retryable``),
after ``Retry-After`` (else an exponential backoff with jitter), and a connection lost before
an answer; from a server that does not say, 429, 503, 529 and a 409 ``session_busy``. Retries
are counted apart from the requests they belong to.

``Load``'s optional ``observe`` hook sees every attempt as it ends (``Sent``): what was sent,
when, and what came back, with each streamed event's type and sequence id. The chaos run
(``benchmarks/chaos``) writes its client history from it; without a hook nothing is collected.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from .report import Outcome
from .sse import SseError, SseParser

RETRYABLE_STATUSES = frozenset({429, 503, 529})
RETRY_AFTER_MAX_S = 30.0
BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 8.0
CLOSE_TIMEOUT_S = 30.0
# After a session could not be opened, a user waits this long before its next try.
FAILED_OPEN_PAUSE_S = 1.0
# Sessions one open-loop run keeps open at once; arrivals past it are counted as dropped.
MAX_OPEN_SESSIONS = 10_000
READ_CHUNK_BYTES = 64 * 1024
FIRST_EVENTS = frozenset({"text_delta", "tool_use"})


@dataclass(frozen=True)
class Plan:
    """The load's shape; see ``hyperfleet loadtest --help`` for each."""

    users: int
    requests: int
    think_time_s: float = 0.0
    ramp_up_s: float = 0.0
    duration_s: float | None = None
    stream: bool = False
    tools_mix: float = 0.0
    rate: float | None = None
    timeout_s: float = 600.0
    max_retries: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        """Raises ValueError naming the flag of a value out of range."""
        problems = [
            (self.users < 1, "--users: at least 1"),
            (self.requests < 1, "--requests: at least 1"),
            (self.think_time_s < 0, "--think-time: at least 0"),
            (self.ramp_up_s < 0, "--ramp-up: at least 0"),
            (self.duration_s is not None and self.duration_s <= 0, "--duration: above 0"),
            (not 0 <= self.tools_mix <= 1, "--tools-mix: a share, 0 to 1"),
            (self.rate is not None and self.rate <= 0, "--rate: above 0 sessions a second"),
            (self.timeout_s <= 0, "--timeout: above 0"),
            (self.max_retries < 0, "--max-retries: at least 0"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


@dataclass(frozen=True)
class Target:
    """Where the load goes: the API, the key the virtual users send, the agent they talk to."""

    base_url: str
    api_key: str
    agent_id: str


@dataclass
class Live:
    """Counters the progress line reads while the run goes on."""

    in_flight: int = 0
    sessions_open: int = 0
    dropped_arrivals: int = 0
    rate_limited: int = 0
    rate_limits_seen: set[int] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    retries: int = 0
    # In the order they ended; the progress line reads the last seconds' from the end.
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.retries += len(outcome.retries)
        if not outcome.ok:
            self.failed += 1
        elif outcome.op == "message":
            self.completed += 1


@dataclass(frozen=True)
class Attempt:
    """One try of a request: its answer (a JSON body or a streamed turn) or why it failed."""

    status: int | None
    error_type: str | None = None
    retry_after_s: float | None = None
    body: dict[str, Any] | None = None
    first_event_at: float | None = None  # perf_counter time of the first text or tool event
    tool_call: bool = False
    # The server's word on resending (``x-should-retry``, a stream error's ``retryable``).
    should_retry: bool | None = None
    ratelimit_limit: int | None = None  # a 429's ``ratelimit-limit``: which window refused it
    # Only with an ``observe`` hook: each streamed event's (type, id), and turn_start's turn id.
    events: tuple[tuple[str, int | None], ...] = ()
    started_turn_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


@dataclass(frozen=True)
class Sent:
    """One attempt of a request, as ``Load``'s ``observe`` hook sees it once it ended."""

    op: Literal["open_session", "message", "close_session"]
    session_id: str | None  # None for an open (its answer names the session)
    idempotency_key: str | None
    number: int  # 0: the first try; then each resend
    sent_at: float  # ``Load.clock`` times
    answered_at: float
    body: dict[str, Any] | None  # what was sent
    stream: bool
    attempt: Attempt


Observe = Callable[[Sent], None]


def retry_delay_s(attempt: Attempt, retries: int, rng: random.Random) -> float | None:
    """How long to wait before resending after ``attempt`` failed (``retries`` already made),
    or None when a good client would not resend: the server's ``Retry-After`` (capped), else
    an exponential backoff with full jitter."""
    if attempt.status is None:  # no answer: a lost connection, a stream cut short
        retryable = attempt.error_type in ("connection", "protocol")
    elif attempt.should_retry is not None:  # the server said
        retryable = attempt.should_retry
    else:
        retryable = attempt.status in RETRYABLE_STATUSES or (
            attempt.status == 409 and attempt.error_type == "session_busy"
        )
    if not retryable:
        return None
    if attempt.retry_after_s is not None:
        return min(max(attempt.retry_after_s, 0.0), RETRY_AFTER_MAX_S)
    return rng.uniform(0.0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**retries))


def message_text(rng: random.Random, tools_mix: float, index: int) -> tuple[str, bool]:
    """The ``index``-th message of a session, and whether it asks for a tool call: the
    emulator's directive for ``write_file`` in a ``tools_mix`` share of messages (a real model
    reads it as an instruction too)."""
    if tools_mix > 0 and rng.random() < tools_mix:
        tool_input = json.dumps({"path": f"loadtest-{index}.txt", "content": f"load {index}"})
        return f"Please save a note. [[tool write_file {tool_input}]]", True
    return f"Load test message {index}: what is the status of the fleet today?", False


def _retry_after(headers: Any, error: dict[str, Any]) -> float | None:
    value = error.get("retry_after_s")
    if isinstance(value, int | float):
        return float(value)
    header = headers.get("Retry-After") if headers is not None else None
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None  # an HTTP date: back off instead


def _usage(turn: dict[str, Any]) -> dict[str, Any]:
    usage = turn.get("usage")
    return usage if isinstance(usage, dict) else {}


class Load:
    """One run's virtual users against one target. Not reusable: ``run`` once."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        target: Target,
        plan: Plan,
        run_id: str,
        live: Live,
        clock: Callable[[], float] = time.perf_counter,
        observe: Observe | None = None,
        close_sessions: bool = True,
    ) -> None:
        """``observe`` sees every attempt (``Sent``); ``close_sessions`` False leaves each
        user's session open at its end (a chaos run reads and resumes them afterwards)."""
        self.http = http
        self.target = target
        self.plan = plan
        self.run_id = run_id
        self.live = live
        self.clock = clock
        self.observe = observe
        self.close_sessions = close_sessions
        self.t0 = clock()
        self.deadline = None if plan.duration_s is None else self.t0 + plan.duration_s
        self.headers = {"Authorization": f"Bearer {target.api_key}"}

    def since_start(self, t: float | None = None) -> float:
        return (self.clock() if t is None else t) - self.t0

    def _over(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    async def _think(self, rng: random.Random) -> None:
        """A think time, cut at the deadline: a user stops when the run does, not a long
        exponential pause later (with thousands of users, the longest is about 8 means)."""
        pause = rng.expovariate(1.0 / self.plan.think_time_s)
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - self.clock()))
        await asyncio.sleep(pause)

    async def run(self) -> None:
        """Apply the load until every virtual user is done."""
        self.t0 = self.clock()
        if self.plan.duration_s is not None:
            self.deadline = self.t0 + self.plan.duration_s
        if self.plan.rate is None:
            async with asyncio.TaskGroup() as group:
                for i in range(self.plan.users):
                    group.create_task(self._closed_user(i))
        else:
            await self._open_loop(self.plan.rate)

    async def _closed_user(self, index: int) -> None:
        rng = random.Random(self.plan.seed * 1_000_003 + index)
        if self.plan.ramp_up_s > 0:
            await asyncio.sleep(self.plan.ramp_up_s * index / self.plan.users)
        session_no = 0
        while not self._over():
            opened = await self._session(f"{index}-{session_no}", rng)
            session_no += 1
            if self.deadline is None:
                return
            if not opened:
                await asyncio.sleep(FAILED_OPEN_PAUSE_S)
            elif self.plan.think_time_s > 0:
                await self._think(rng)

    async def _open_loop(self, rate: float) -> None:
        """Poisson arrivals at ``rate`` a second; with a ramp, an arrival at ``t`` is kept with
        probability ``t / ramp_up_s`` (thinning), so the rate grows linearly to ``rate``."""
        rng = random.Random(self.plan.seed)
        arrived = 0
        t = 0.0
        tasks: set[asyncio.Task[bool]] = set()
        try:
            while self.deadline is not None or arrived < self.plan.users:
                t += rng.expovariate(rate)
                if self.plan.duration_s is not None and t >= self.plan.duration_s:
                    break
                if self.plan.ramp_up_s > 0 and rng.random() > min(1.0, t / self.plan.ramp_up_s):
                    continue
                delay = self.t0 + t - self.clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                arrived += 1
                if len(tasks) >= MAX_OPEN_SESSIONS:
                    self.live.dropped_arrivals += 1
                    continue
                user_rng = random.Random(self.plan.seed * 1_000_003 + arrived)
                task = asyncio.create_task(self._session(str(arrived), user_rng))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _session(self, name: str, rng: random.Random) -> bool:
        """Open a session, send the plan's messages with think times, close it. False if the
        session could not be opened."""
        path = f"/v1/agents/{self.target.agent_id}/sessions"
        _, session = await self._request("open_session", path, None, rng)
        if session is None:
            return False
        self.live.sessions_open += 1
        try:
            for i in range(self.plan.requests):
                if i and self.plan.think_time_s > 0:
                    await self._think(rng)
                if self._over():
                    break
                text, tool = message_text(rng, self.plan.tools_mix, i)
                body = {"content": text, "stream": self.plan.stream}
                key = f"lt-{self.run_id}-{name}-{i}"
                await self._request(
                    "message",
                    f"/v1/sessions/{session['id']}/messages",
                    body,
                    rng,
                    key,
                    tool,
                    session["id"],
                )
        finally:
            self.live.sessions_open -= 1
            if self.close_sessions:
                await self._close(session["id"])
        return True

    async def _close(self, session_id: str) -> None:
        # Closing frees the user's max_sessions; it is the tester's housekeeping, not load.
        sent_at = self.clock()
        attempt = Attempt(None, "connection")
        try:
            async with self.http.delete(
                f"{self.target.base_url}/v1/sessions/{session_id}",
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=CLOSE_TIMEOUT_S),
            ) as response:
                raw = await response.read()
                if self.observe is not None:
                    attempt = attempt_of_json(response.status, response.headers, raw)
        except (aiohttp.ClientError, TimeoutError):
            pass  # the session idles out on the server (session_idle_ttl_s)
        if self.observe is not None:
            ended = self.clock()
            self.observe(
                Sent("close_session", session_id, None, 0, sent_at, ended, None, False, attempt)
            )

    async def _request(
        self,
        op: Literal["message", "open_session"],
        path: str,
        body: dict[str, Any] | None,
        rng: random.Random,
        idempotency_key: str | None = None,
        tool: bool = False,
        session_id: str | None = None,
    ) -> tuple[Outcome, dict[str, Any] | None]:
        """Send with retries; record and return its outcome and, on success, its answer."""
        started = self.clock()
        retries: list[tuple[float, str]] = []
        headers = dict(self.headers)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        self.live.in_flight += 1
        try:
            while True:
                streamed = op == "message" and self.plan.stream
                sent_at = self.clock()
                attempt = await (
                    self._attempt_stream(path, body, headers)
                    if streamed
                    else self._attempt_json(path, body, headers)
                )
                if self.observe is not None:
                    self.observe(
                        Sent(
                            op,
                            session_id,
                            idempotency_key,
                            len(retries),
                            sent_at,
                            self.clock(),
                            body,
                            streamed,
                            attempt,
                        )
                    )
                if attempt.status == 429:
                    self.live.rate_limited += 1
                    if attempt.ratelimit_limit is not None:
                        self.live.rate_limits_seen.add(attempt.ratelimit_limit)
                if attempt.ok or len(retries) >= self.plan.max_retries:
                    break
                delay = retry_delay_s(attempt, len(retries), rng)
                if delay is None:
                    break
                reason = str(attempt.status) if attempt.status else str(attempt.error_type)
                retries.append((self.since_start(), reason))
                await asyncio.sleep(delay)
        finally:
            self.live.in_flight -= 1
        ended = self.clock()
        turn = attempt.body or {}
        usage = _usage(turn)
        outcome = Outcome(
            op=op,
            start_s=self.since_start(started),
            end_s=self.since_start(ended),
            ok=attempt.ok,
            status=attempt.status,
            error_type=attempt.error_type,
            ttft_s=None if attempt.first_event_at is None else attempt.first_event_at - started,
            retries=tuple(retries),
            input_tokens=sum(
                int(usage.get(k) or 0)
                for k in (
                    "input_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                )
            ),
            output_tokens=int(usage.get("output_tokens") or 0),
            cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0),
            cost_usd=float(turn.get("cost_usd") or 0.0) if attempt.ok else 0.0,
            tool_call=attempt.ok and (tool or attempt.tool_call),
        )
        self.live.add(outcome)
        return outcome, attempt.body if attempt.ok else None

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.plan.timeout_s)

    async def _attempt_json(
        self, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> Attempt:
        try:
            async with self.http.post(
                self.target.base_url + path, json=body, headers=headers, timeout=self._timeout()
            ) as response:
                raw = await response.read()
                return attempt_of_json(response.status, response.headers, raw)
        except TimeoutError:
            return Attempt(None, "timeout")
        except aiohttp.ClientError:
            return Attempt(None, "connection")

    async def _attempt_stream(
        self, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> Attempt:
        first: float | None = None
        tool_call = False
        # What the observe hook gets: each event's (type, id), and the turn id it started.
        seen: list[tuple[str, int | None]] | None = [] if self.observe is not None else None
        turn_id: str | None = None
        try:
            async with self.http.post(
                self.target.base_url + path, json=body, headers=headers, timeout=self._timeout()
            ) as response:
                if response.status != 200:
                    return attempt_of_json(response.status, response.headers, await response.read())
                parser = SseParser()
                async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                    for event in parser.feed(chunk):
                        if seen is not None:
                            seen.append((event.type, _seq(event.id)))
                            if event.type == "turn_start":
                                turn_id = str(event.data.get("turn_id") or "") or None
                        if event.type in FIRST_EVENTS and first is None:
                            first = self.clock()
                        tool_call = tool_call or event.type == "tool_use"
                        if event.type == "turn_end":
                            return Attempt(
                                200,
                                None,
                                None,
                                event.data,
                                first,
                                tool_call,
                                events=tuple(seen or ()),
                                started_turn_id=turn_id,
                            )
                        if event.type == "error":
                            status = event.data.get("status_code")
                            return Attempt(
                                status if isinstance(status, int) else 500,
                                str(event.data.get("type") or "api_error"),
                                _retry_after(None, event.data),
                                first_event_at=first,
                                should_retry=_flag(event.data.get("retryable")),
                                events=tuple(seen or ()),
                                started_turn_id=turn_id,
                            )
                # The stream ended with no turn_end.
                return Attempt(None, "protocol", events=tuple(seen or ()), started_turn_id=turn_id)
        except TimeoutError:
            return Attempt(None, "timeout", events=tuple(seen or ()), started_turn_id=turn_id)
        except SseError:
            return Attempt(None, "protocol", events=tuple(seen or ()), started_turn_id=turn_id)
        except aiohttp.ClientError:
            return Attempt(None, "connection", events=tuple(seen or ()), started_turn_id=turn_id)


def _seq(event_id: str | None) -> int | None:
    try:
        return int(event_id) if event_id is not None else None
    except ValueError:
        return None


def attempt_of_json(status: int, headers: Any, raw: bytes) -> Attempt:
    """An attempt answered with a JSON body (or none): the turn, or the API's error."""
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {}
    if not isinstance(parsed, dict):
        parsed = {}
    if 200 <= status < 300:
        return Attempt(status, None, None, parsed)
    error = parsed.get("error")
    error = error if isinstance(error, dict) else {}
    limit = headers.get("ratelimit-limit", "")
    return Attempt(
        status,
        str(error.get("type") or "http_error"),
        _retry_after(headers, error),
        ratelimit_limit=int(limit) if limit.isdigit() else None,
        should_retry=_flag(headers.get("x-should-retry")),
    )


def _flag(value: object) -> bool | None:
    """``x-should-retry``'s ``true``/``false`` (or a JSON boolean); None when absent or odd."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None
