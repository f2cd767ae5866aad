"""The client history of a chaos run: every request the workload made and what came of it, and
every fault injected, one JSON object a line, in the order they ended.

A ``Request`` is one attempt (a resend is another line with the next ``attempt`` number): its
op (``open``, ``message``, ``transcript``, ``close``), the session, the idempotency key, when it
was sent and answered (``time.time()`` seconds), the HTTP status or the transport error, and for a
message the turn it acknowledged (``turn_id``, ``index``) and, streamed, each event's type and
sequence id. A message is *acknowledged* when a 200 JSON turn came back, or its stream reached
``turn_end``; only acknowledged turns are promised to be kept. A ``Fault`` is one injection, with
when it started and ended (``ended_at == started_at`` for an instant one, a kill).

The file is written as the run goes (a line buffered, so a run that crashes leaves what it saw);
``read`` gives the same records back to the checker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from cluster.loadtest.users import Sent

Op = Literal["open", "message", "transcript", "close"]
_OPS: dict[str, Op] = {"open_session": "open", "message": "message", "close_session": "close"}


@dataclass(frozen=True)
class Request:
    op: Op
    session_id: str | None
    key: str | None
    attempt: int
    sent_at: float
    answered_at: float
    status: int | None
    error: str | None  # the API's error type, or a transport error: connection, timeout, protocol
    content: str | None = None  # a message's text
    stream: bool = False
    acked: bool = False
    turn_id: str | None = None  # an acknowledged turn's
    index: int | None = None
    replayed: bool = False
    # Streamed: each event's [type, sequence id], in the order they came.
    events: list[tuple[str, int | None]] = field(default_factory=list)
    started_turn_id: str | None = None  # a stream's turn_start, acknowledged or not
    probe: bool = False  # sent after the run, to see the session resume

    @property
    def turn_end(self) -> bool:
        return any(kind == "turn_end" for kind, _ in self.events)


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str
    started_at: float
    ended_at: float
    detail: str = ""
    # upstream-faults: what the faulty model API saw in its window (``calls``, ``faults``).
    model: dict[str, int] = field(default_factory=dict)


Record = Request | Fault


def request_of(sent: Sent, wall_of: Callable[[float], float]) -> Request:
    """The history's record of one attempt the load tester made (its ``observe`` hook);
    ``wall_of`` turns the tester's clock into ``time.time()`` seconds."""
    attempt = sent.attempt
    body = attempt.body or {}
    session_id = sent.session_id
    if sent.op == "open_session" and attempt.ok:
        session_id = str(body.get("id") or "") or None
    acked = sent.op == "message" and attempt.ok and bool(body.get("turn_id"))
    content = (sent.body or {}).get("content")
    index = body.get("index") if acked else None
    return Request(
        op=_OPS[sent.op],
        session_id=session_id,
        key=sent.idempotency_key,
        attempt=sent.number,
        sent_at=wall_of(sent.sent_at),
        answered_at=wall_of(sent.answered_at),
        status=attempt.status,
        error=attempt.error_type,
        content=content if isinstance(content, str) else None,
        stream=sent.stream,
        acked=acked,
        turn_id=str(body["turn_id"]) if acked else None,
        index=index if isinstance(index, int) else None,
        replayed=bool(body.get("replayed")) if acked else False,
        events=list(attempt.events),
        started_turn_id=attempt.started_turn_id,
    )


class History:
    """Appends records to a JSON-lines file and keeps them in memory for the checker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[Record] = []
        self._file: IO[str] = path.open("a", buffering=1)

    def add(self, record: Record) -> None:
        self.records.append(record)
        kind = "fault" if isinstance(record, Fault) else "request"
        self._file.write(json.dumps({"record": kind, **asdict(record)}) + "\n")

    def observer(self, clock: Callable[[], float]) -> Callable[[Sent], None]:
        """A ``Load`` ``observe`` hook that records into this history; ``clock`` is the
        ``Load``'s (its times are turned into wall-clock seconds)."""

        def wall_of(t: float) -> float:
            return time.time() - (clock() - t)

        def observe(sent: Sent) -> None:
            self.add(request_of(sent, wall_of))

        return observe

    def requests(self) -> list[Request]:
        return [r for r in self.records if isinstance(r, Request)]

    def faults(self) -> list[Fault]:
        return [r for r in self.records if isinstance(r, Fault)]

    def close(self) -> None:
        self._file.close()


def _from_json(data: dict[str, Any]) -> Record:
    if data.pop("record") == "fault":
        return Fault(**data)
    data["events"] = [(str(t), s) for t, s in data.get("events", [])]
    return Request(**data)


def read(path: Path) -> Iterator[Record]:
    """The records a ``History`` wrote to ``path``, in order."""
    with path.open() as f:
        for line in f:
            if line.strip():
                yield _from_json(json.loads(line))
