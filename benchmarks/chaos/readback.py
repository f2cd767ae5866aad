"""Reading back what a chaos run left: each session resumed with one more message (the probe),
then its whole transcript through the API (``GET /v1/sessions/{id}/messages``, paginated), and
what the control store metered, from its SQLite file opened read-only.

Every request made here goes into the history too (``transcript``, and the probe as a
``message`` marked ``probe``), retried as the load tester retries, so a session counts as not
resumable only when a good client could not get through. The control store is read straight
from its database: the API has no view of record ids (``metered_turns``), and the checker needs
them to tell a turn metered once from one never metered. The stores' outbox sweeps send what a
killed replica left after a grace (``usage_outbox_grace_s``), so the read waits, up to a bound,
for every committed turn's final record.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from cluster.loadtest.users import Attempt, attempt_of_json, retry_delay_s
from serve_app.usage_sql import TOKEN_FIELDS

from .checker import MeterState, SessionState, TurnSeen
from .history import History, Request

PAGE_LIMIT = 200  # the API's largest page
ATTEMPTS_MAX = 8
REQUEST_TIMEOUT_S = 60.0
METER_POLL_S = 1.0
PROBE_TEXT = "Chaos probe: are you still there?"


def _user_text(turn: dict[str, Any]) -> str | None:
    for message in turn.get("messages") or []:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return None


def _tokens(turn: dict[str, Any]) -> int:
    usage = turn.get("usage") or {}
    return sum(int(usage.get(f) or 0) for f in TOKEN_FIELDS)


class Reader:
    """Reads sessions back through the API as ``key``'s user, recording into ``history``."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, key: str, history: History):
        self.http = http
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.history = history
        self.rng = random.Random(0)

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, extra: dict[str, str]
    ) -> tuple[Attempt, float, float]:
        sent = time.time()
        try:
            async with self.http.request(
                method,
                self.base_url + path,
                json=body,
                headers={**self.headers, **extra},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            ) as response:
                attempt = attempt_of_json(response.status, response.headers, await response.read())
        except TimeoutError:
            attempt = Attempt(None, "timeout")
        except aiohttp.ClientError:
            attempt = Attempt(None, "connection")
        return attempt, sent, time.time()

    async def _retried(
        self,
        method: str,
        path: str,
        session_id: str,
        body: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Attempt:
        extra = {"Idempotency-Key": key} if key else {}
        for n in range(ATTEMPTS_MAX):
            attempt, sent, answered = await self._send(method, path, body, extra)
            turn = attempt.body or {}
            acked = body is not None and attempt.ok and bool(turn.get("turn_id"))
            self.history.add(
                Request(
                    op="message" if body is not None else "transcript",
                    session_id=session_id,
                    key=key,
                    attempt=n,
                    sent_at=sent,
                    answered_at=answered,
                    status=attempt.status,
                    error=attempt.error_type,
                    content=body.get("content") if body else None,
                    acked=acked,
                    turn_id=str(turn["turn_id"]) if acked else None,
                    index=turn.get("index") if acked else None,
                    probe=body is not None,
                )
            )
            delay = retry_delay_s(attempt, n, self.rng)
            if attempt.ok or delay is None:
                return attempt
            await asyncio.sleep(delay)
        return attempt

    async def probe(self, session_id: str, run_id: str) -> str | None:
        """One more message in the session; None if it was acknowledged, else why not."""
        body = {"content": f"{PROBE_TEXT} ({session_id})"}
        key = f"chaos-{run_id}-probe-{session_id}"
        path = f"/v1/sessions/{session_id}/messages"
        attempt = await self._retried("POST", path, session_id, body, key)
        return None if attempt.ok else f"{attempt.status} {attempt.error_type}"

    async def transcript(self, session_id: str) -> SessionState:
        turns: list[TurnSeen] = []
        after = 0
        version = None
        while True:
            path = f"/v1/sessions/{session_id}/messages?after={after}&limit={PAGE_LIMIT}"
            attempt = await self._retried("GET", path, session_id)
            if not attempt.ok:
                error = f"{attempt.status} {attempt.error_type}"
                return SessionState(session_id, None, read_error=error)
            page = attempt.body or {}
            got = page.get("turns") or []
            version = page.get("version")
            turns += [
                TurnSeen(int(t["index"]), str(t["turn_id"]), _user_text(t), _tokens(t)) for t in got
            ]
            if not page.get("has_more") or not got:
                break
            after = int(got[-1]["index"])
        return SessionState(session_id, tuple(turns), version if isinstance(version, int) else None)

    async def session(self, session_id: str, run_id: str) -> SessionState:
        """Resumed (the probe), then read: the probe's turn should be the transcript's last."""
        resume_error = await self.probe(session_id, run_id)
        state = await self.transcript(session_id)
        return SessionState(
            state.session_id, state.turns, state.version, state.read_error, resume_error
        )


def read_meter(
    db: Path, user_id: str, agent_id: str, since: float, turn_ids: set[str], wait_s: float
) -> MeterState:
    """What the control store at ``db`` metered since ``since`` (``time.time()``), once every
    turn of ``turn_ids`` has its final record there or ``wait_s`` passed."""
    deadline = time.monotonic() + wait_s
    while True:
        state = _meter_now(db, user_id, agent_id, since)
        missing = {f"{t}:end" for t in turn_ids} - state.metered_ids
        if not missing or time.monotonic() > deadline:
            return state
        time.sleep(METER_POLL_S)


def _meter_now(db: Path, user_id: str, agent_id: str, since: float) -> MeterState:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        ids = frozenset(
            str(row[0])
            for row in conn.execute("SELECT turn_id FROM metered_turns WHERE at >= ?", (since,))
        )
        tokens = " + ".join(TOKEN_FIELDS)
        turns, used = conn.execute(
            f"SELECT COALESCE(SUM(turns), 0), COALESCE(SUM({tokens}), 0) FROM usage "  # noqa: S608
            "WHERE user_id = ? AND agent_id = ?",
            (user_id, agent_id),
        ).fetchone()
    ends = sum(i.endswith(":end") for i in ids)
    return MeterState(ids, ends, int(turns), int(used))
