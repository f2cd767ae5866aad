"""A session in a replica's memory: its transcript as Messages API messages, its version (the
number of committed turns), its event sequence, and a lock that makes it run one turn at a time.

Only committed turns are ever in ``messages``: a turn's messages are appended after the store took
them, so a failed or interrupted turn leaves no trace and the same message can be sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .store import SessionRecord, TurnRecord
from .tools import Workspace


def digest(content: str | list[dict[str, Any]]) -> str:
    """Identifies a user message, to tell an idempotent resend from a reused key."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(eq=False)
class Session:
    record: SessionRecord
    workspace: Workspace
    last_used: float
    messages: list[dict[str, Any]] = field(default_factory=list)
    version: int = 0
    seq: int = 0
    turn_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def id(self) -> str:
        return self.record.session_id

    @property
    def busy(self) -> bool:
        return self.turn_lock.locked()

    def apply(self, turn: TurnRecord, restore_seq: bool) -> None:
        """Appends a committed turn; on reload, the event sequence resumes after it."""
        self.messages.extend(turn.messages)
        self.version = turn.index
        if restore_seq:
            self.seq = max(self.seq, turn.last_seq)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq
