"""Structured logs: JSON lines carrying the request's trace, text on request, bounded fields."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from hyperfleet import logs

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logs.configure("replica", {})
    handler.setStream(stream)  # type: ignore[attr-defined]
    yield logging.getLogger("hyperfleet.test"), stream
    logging.getLogger().removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_records_are_json_with_the_trace_of_their_block(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = captured
    log.info("outside")
    outer = logs.traced(request_id="req-1", session_id="ses_1", traceparent=TRACEPARENT)
    with outer, logs.traced(model_request_id="req_011", agent_id=None):
        log.warning("model call %s", "done")
    first, second = _lines(stream)
    assert first["message"] == "outside" and first["role"] == "replica"
    assert "request_id" not in first and first["level"] == "INFO"
    assert second["message"] == "model call done" and second["level"] == "WARNING"
    assert second["request_id"] == "req-1" and second["session_id"] == "ses_1"
    assert second["model_request_id"] == "req_011" and "agent_id" not in second
    assert second["traceparent"] == TRACEPARENT and second["logger"] == "hyperfleet.test"


async def test_tasks_inherit_the_trace(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = captured
    with logs.traced(request_id="req-2"):
        task = asyncio.create_task(asyncio.sleep(0, result=None))
        await task
        await asyncio.create_task(_log_later(log))
    assert _lines(stream)[-1]["request_id"] == "req-2"


async def _log_later(log: logging.Logger) -> None:
    await asyncio.sleep(0)
    log.info("from a task")


def test_text_format_for_people() -> None:
    stream = io.StringIO()
    handler = logs.configure("ingress", {"HYPERFLEET_LOG_FORMAT": "text"})
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        with logs.traced(request_id="req-3"):
            logging.getLogger("x").info("hello")
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue()
    assert "INFO ingress x: hello" in line and "request_id=req-3" in line
    assert not line.lstrip().startswith("{")


def test_configure_twice_keeps_one_handler() -> None:
    first = logs.configure("a", {})
    second = logs.configure("b", {})
    try:
        names = [h for h in logging.getLogger().handlers if h.name == "hyperfleet"]
        assert names == [second] and first not in logging.getLogger().handlers
    finally:
        logging.getLogger().removeHandler(second)


def test_client_fields_are_bounded_and_traceparents_checked() -> None:
    with logs.traced(request_id="x" * 1_000) as trace:
        assert len(trace["request_id"]) == logs.MAX_FIELD_CHARS
    assert logs.valid_traceparent(TRACEPARENT) == TRACEPARENT
    for bad in ("", "garbage", TRACEPARENT.upper(), "00-" + "0" * 32 + "-00f067aa0ba902b7-01"):
        assert logs.valid_traceparent(bad) is None
