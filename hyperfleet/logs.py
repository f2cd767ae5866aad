"""Structured logs: JSON lines from every Hyperfleet process, carrying the request's trace.

``configure(role)`` is called once at each process's entry (the ingress, an agent replica, the
stores, the node provider, the join service, the node agent, the CLI's daemons): it gives the root
logger one handler on stderr (in a Ray worker, stderr is the worker's ``.err`` file under the
session's ``logs/``) whose formatter writes JSON (``python-json-logger``), or text for people when
``HYPERFLEET_LOG_FORMAT=text``.

Every record carries ``role`` and, when set, the fields of ``trace``: the ingress's request id (the
``x-request-id`` it answers with), the client's W3C ``traceparent``, the session and the agent,
and the Anthropic ``request-id`` of the model call being logged. They live in a context variable:
``traced(...)`` sets them for a block (an asyncio task inherits them), so a replica that runs a
turn for a request logs that request's id on every line, down to the model call.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

FORMAT_ENV = "HYPERFLEET_LOG_FORMAT"
LEVEL_ENV = "HYPERFLEET_LOG_LEVEL"
TRACE_FIELDS = ("request_id", "traceparent", "session_id", "agent_id", "model_request_id")
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "anthropic")
MAX_FIELD_CHARS = 128  # a client's header is logged, not trusted: bounded
# W3C Trace Context, version 00: version-trace id-parent id-flags, lowercase hex, ids not all zero.
_TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")

_NO_TRACE: Mapping[str, str] = MappingProxyType({})
_trace: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "trace", default=_NO_TRACE
)
_HANDLER_NAME = "hyperfleet"


def valid_traceparent(value: str | None) -> str | None:
    """``value`` if it is a W3C ``traceparent`` (version 00), else None: passed on only if
    well formed."""
    if value is None:
        return None
    value = value.strip()
    return value if _TRACEPARENT.match(value) else None


def current() -> Mapping[str, str]:
    """The trace fields set here (``traced``)."""
    return _trace.get()


@contextlib.contextmanager
def traced(**fields: str | None) -> Iterator[Mapping[str, str]]:
    """Adds ``fields`` (those not None, each cut to ``MAX_FIELD_CHARS``) to the trace of every
    record logged inside the block, and of the tasks it starts."""
    merged = dict(_trace.get())
    merged.update({k: str(v)[:MAX_FIELD_CHARS] for k, v in fields.items() if v is not None})
    token = _trace.set(MappingProxyType(merged))
    try:
        yield merged
    finally:
        _trace.reset(token)


class _TraceFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        for key, value in _trace.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _Text(logging.Formatter):
    """For people: the usual line, then the trace fields that are set."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in TRACE_FIELDS if hasattr(record, k))
        return f"{line} [{extra}]" if extra else line


def formatter(text: bool) -> logging.Formatter:
    if text:
        return _Text("%(asctime)s %(levelname)s %(role)s %(name)s: %(message)s")
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        timestamp=False,
        json_ensure_ascii=False,
    )


def configure(
    role: str, environ: Mapping[str, str] | None = None, logger: str | None = None
) -> logging.Handler:
    """Structured logging for this process (idempotent: a second call replaces the first's
    handler, so a restarted actor's ``__init__`` may call it again). ``logger`` limits it to
    one logger's tree, which then stops passing records up: for code that runs inside another
    program's process (the node provider, in Ray's autoscaler), whose own logs stay as they
    are."""
    env = os.environ if environ is None else environ
    text = env.get(FORMAT_ENV, "json").lower() == "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.name = _HANDLER_NAME
    handler.setFormatter(formatter(text))
    handler.addFilter(_TraceFilter(role))
    target = logging.getLogger(logger)
    for old in [h for h in target.handlers if h.name == _HANDLER_NAME]:
        target.removeHandler(old)
    target.addHandler(handler)
    target.setLevel(env.get(LEVEL_ENV, "INFO").upper())
    if logger is not None:
        target.propagate = False
    else:
        # HTTP clients log every request at INFO; a model call has its own line.
        for chatty in QUIET_LOGGERS:
            logging.getLogger(chatty).setLevel(logging.WARNING)
    return handler


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The trace fields a record carries (for tests and tools)."""
    return {k: getattr(record, k) for k in ("role", *TRACE_FIELDS) if hasattr(record, k)}
