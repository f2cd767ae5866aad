"""The agent loop: one user message in, model calls and tool runs until the model is done.

Each model call is a streaming Messages call on the official ``AsyncAnthropic`` client (the real
API and the emulator are one code path). ``tool_use`` runs the tools, concurrently when several are
asked for, sends their ``tool_result`` blocks back and calls again, until ``end_turn``,
``max_tokens``, or ``max_turns`` model calls (then ``stop_reason: "max_turns"``).

Failures: the SDK's own retries (``max_retries`` on the client) handle errors answered before a
stream starts; the loop adds no second retry around them. A stream that breaks before its first
content block is retried here with backoff, since nothing was shown yet. A break after content
ends the turn with ``UpstreamError``: nothing of it is committed and the caller may send the same
message again. Every failure and success feeds the credential's circuit breaker.

Metering: every model call's usage goes to the turn's ``TurnMeter`` as soon as the call ends, a
call that broke included (what its stream reported). Before the tools of a call run, and before a
stream attempt is retried, the meter meters what is new and checks the day's budget for the next
call (``hyperfleet.metering``).

Interruption: ``run`` keeps what the turn has done so far in a ``TurnProgress`` the caller holds;
a caller that cancels the run to interrupt it builds the interrupted turn from it
(``interrupted_outcome``): the messages so far, the text the model had streamed, and an error
``tool_result`` for every tool that was cut off, so the transcript stays a valid conversation.

Prompt caching: ``cache_control`` marks the tools, the system prompt and the end of the
conversation so far, so each call of a long tool loop reads the previous call's prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hyperfleet import logs
from hyperfleet.errors import CircuitOpenError, UpstreamError, UpstreamRefusedError
from hyperfleet.metering import CHARS_PER_TOKEN

from . import metrics
from .breaker import CircuitBreaker
from .events import Emit, TextCoalescer
from .meter import TurnMeter
from .model_client import PendingClient
from .pricing import Usage
from .reply import IncompleteReplyError, ModelReply, ReplyAccumulator
from .tools import Tool, ToolResult, Workspace

if TYPE_CHECKING:
    import anthropic

logger = logging.getLogger(__name__)
STREAM_ATTEMPTS = 3
STREAM_BACKOFF_S = 0.25
_CACHE = {"type": "ephemeral"}
# Answered before the stream started, after the SDK's own retries: not the loop's to retry.
_CLIENT_ERRORS = (400, 401, 403, 404, 413, 422)
INTERRUPTED = "interrupted"
INTERRUPTED_TOOL = "[interrupted: the user sent a new message before this tool finished]"


@dataclass(frozen=True)
class LoopConfig:
    model: str
    system: str
    max_tokens: int
    max_turns: int
    temperature: float | None = None
    stream_attempts: int = STREAM_ATTEMPTS
    stream_backoff_s: float = STREAM_BACKOFF_S


@dataclass(frozen=True)
class TurnOutcome:
    messages: list[dict[str, Any]]  # the user message and everything the agent added
    content: list[dict[str, Any]]  # the final assistant message's blocks
    stop_reason: str
    usage: Usage
    model_calls: int


@dataclass
class TurnProgress:
    """What a running turn has done: its messages so far and the model call in progress."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    reply: ReplyAccumulator | None = None
    calls: int = 0


def interrupted_outcome(progress: TurnProgress, meter: TurnMeter) -> TurnOutcome:
    """The turn as it stood when it was interrupted, ``stop_reason: "interrupted"``."""
    messages = list(progress.messages)
    content: list[dict[str, Any]] = []
    if progress.reply is not None:
        content = progress.reply.shown_text()
        if content:
            messages.append({"role": "assistant", "content": content})
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        uses = [b for b in last["content"] if b.get("type") == "tool_use"]
        if uses:  # cut off while its tools ran: each gets an error result
            results = [
                {
                    "type": "tool_result",
                    "tool_use_id": use["id"],
                    "content": INTERRUPTED_TOOL,
                    "is_error": True,
                }
                for use in uses
            ]
            messages.append({"role": "user", "content": results})
    return TurnOutcome(messages, content, INTERRUPTED, sum(meter.calls, Usage()), progress.calls)


class AgentLoop:
    def __init__(
        self,
        client: anthropic.AsyncAnthropic | PendingClient,
        config: LoopConfig,
        tools: dict[str, Tool],
        breaker: CircuitBreaker,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.config = config
        self.tools = tools
        self.breaker = breaker
        self._sleep = sleep
        self._tool_defs = [t.definition() for t in tools.values()]
        if self._tool_defs:
            self._tool_defs[-1] = {**self._tool_defs[-1], "cache_control": _CACHE}
        self._system = (
            [{"type": "text", "text": config.system, "cache_control": _CACHE}]
            if config.system
            else None
        )

    async def run(
        self,
        history: list[dict[str, Any]],
        user_content: str | list[dict[str, Any]],
        workspace: Workspace,
        emit: Emit,
        meter: TurnMeter | None = None,
        progress: TurnProgress | None = None,
    ) -> TurnOutcome:
        """Runs one turn. Raises ``UpstreamError`` (or ``CircuitOpenError``) if the model fails,
        ``BudgetExceededError`` if ``meter`` refuses a call. The outcome's usage is every call's
        that ``meter`` counted, broken attempts included. ``progress`` (if given) follows the
        turn as it runs."""
        if meter is None:
            meter = TurnMeter("", "", "", self.config.model, None, None)
        if progress is None:
            progress = TurnProgress()
        added = progress.messages
        added[:] = [{"role": "user", "content": user_content}]
        calls = 0
        stop_reason = "max_turns"
        content: list[dict[str, Any]] = []
        meter.start()
        while calls < self.config.max_turns:
            calls += 1
            progress.calls = calls
            message = await self._call([*history, *added], emit, meter, progress)
            content = message.content
            added.append({"role": "assistant", "content": content})
            progress.reply = None
            if message.stop_reason != "tool_use":
                stop_reason = message.stop_reason or "end_turn"
                break
            uses = [b for b in content if b["type"] == "tool_use"]
            for use in uses:
                await emit(
                    "tool_use", {"id": use["id"], "name": use["name"], "input": use["input"]}
                )
            # Metered before the tools run (they may run long), and the next call checked
            # against the day's budget.
            await meter.checkpoint(self.config.max_tokens, calls < self.config.max_turns)
            results = await asyncio.gather(*(self._run_tool(u, workspace) for u in uses))
            blocks = []
            for use, result in zip(uses, results, strict=True):
                block: dict[str, Any] = {
                    "type": "tool_result",
                    "tool_use_id": use["id"],
                    "content": result.content,
                }
                if result.is_error:
                    block["is_error"] = True
                blocks.append(block)
            # In the turn before it is streamed: an interrupt from here on keeps the results.
            added.append({"role": "user", "content": blocks})
            for block in blocks:
                await emit(
                    "tool_result",
                    {
                        "tool_use_id": block["tool_use_id"],
                        "content": block["content"],
                        "is_error": bool(block.get("is_error")),
                    },
                )
        return TurnOutcome(added, content, stop_reason, sum(meter.calls, Usage()), calls)

    async def _run_tool(self, use: dict[str, Any], workspace: Workspace) -> ToolResult:
        started = time.monotonic()
        result = await self._tool_result(use, workspace)
        outcome: metrics.ToolOutcome = (
            "timeout" if result.timed_out else "error" if result.is_error else "ok"
        )
        label = metrics.tool_label(use["name"], self.tools)
        metrics.tool_ran(label, outcome, time.monotonic() - started)
        return result

    async def _tool_result(self, use: dict[str, Any], workspace: Workspace) -> ToolResult:
        tool = self.tools.get(use["name"])
        if tool is None:
            return ToolResult(f"there is no tool named {use['name']!r}", is_error=True)
        try:
            return await tool.run(use.get("input") or {}, workspace)
        except Exception as e:  # a tool bug must not end the turn: the model reads the failure
            logger.exception("tool %s failed", use["name"])
            return ToolResult(f"the tool failed: {type(e).__name__}: {e}", is_error=True)

    def _params(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        marked = list(messages)
        last = copy.copy(marked[-1])
        blocks = last["content"]
        if isinstance(blocks, str):
            blocks = [{"type": "text", "text": blocks}]
        blocks = [*blocks[:-1], {**blocks[-1], "cache_control": _CACHE}]
        marked[-1] = {**last, "content": blocks}
        params: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": self.config.max_tokens,
            "messages": marked,
        }
        if self._system is not None:
            params["system"] = self._system
        if self._tool_defs:
            params["tools"] = self._tool_defs
        if self.config.temperature is not None:
            params["temperature"] = self.config.temperature
        return params

    async def _call(
        self,
        messages: list[dict[str, Any]],
        emit: Emit,
        meter: TurnMeter,
        progress: TurnProgress,
    ) -> ModelReply:
        if isinstance(self.client, PendingClient):
            self.client = await self.client.get()
        client = self.client
        # Imported here, not at the top: a replica imports the SDK on a thread (model_client.py),
        # and by now it has.
        import anthropic
        import httpx2

        params = self._params(messages)
        model = self.config.model
        last_error: Exception | None = None
        for attempt in range(self.config.stream_attempts):
            if attempt:
                # A broken attempt that reported usage is billed; the retry sends its input again.
                await meter.checkpoint(self.config.max_tokens)
            coalescer = TextCoalescer(emit)
            reply = ReplyAccumulator()
            progress.reply = reply
            began = time.monotonic()
            # Every way out of this block records an outcome (``CircuitBreaker.attempt``): a 4xx
            # or a cancellation during a half-open trial must not leave the breaker refusing.
            try:
                with self.breaker.attempt() as call, _metered(reply, meter, model):
                    try:
                        stream = await client.messages.create(
                            **params, stream=True, extra_headers=_trace_headers()
                        )
                        request_id = stream.response.headers.get("request-id")
                        async with stream:
                            async for event in stream:
                                text = reply.add(event)
                                if text:
                                    await coalescer.add(text)
                                elif event.type == "content_block_stop":
                                    # A text block's tail goes before a tool's input streams.
                                    await coalescer.flush()
                                else:  # a tool's input, thinking, a ping: time passes too
                                    await coalescer.tick()
                        message = reply.result()
                        await coalescer.flush()
                        call.succeeded()
                        took_s = time.monotonic() - began
                        metrics.model_called(model, "ok", took_s)
                        _log_call(request_id, model, took_s, message)
                        return message
                    except anthropic.APIStatusError as e:
                        outcome = status_outcome(e.status_code, e.body)
                        logger.warning(
                            "model call failed: %s %s",
                            e.status_code,
                            outcome,
                            extra={"model_request_id": e.request_id},
                        )
                        metrics.model_called(model, outcome, time.monotonic() - began)
                        if e.status_code in _CLIENT_ERRORS:  # neutral: the API answered
                            raise UpstreamRefusedError(
                                f"the model API refused the request: {e.message}"
                            ) from e
                        call.failed()
                        if e.response.status_code != 200:  # the SDK already retried this one
                            raise UpstreamError(f"the model API failed: {e.message}") from e
                        last_error = e
                    except (
                        anthropic.APIConnectionError,
                        httpx2.TransportError,
                        IncompleteReplyError,
                    ) as e:
                        broken = isinstance(e, IncompleteReplyError)
                        outcome = "stream_broken" if broken else "connection"
                        metrics.model_called(model, outcome, time.monotonic() - began)
                        call.failed()
                        last_error = e
            except CircuitOpenError:
                metrics.model_called(model, "circuit_open", 0.0)
                raise
            except asyncio.CancelledError:  # the turn's time limit, or the turn cancelled
                metrics.model_called(model, "cancelled", time.monotonic() - began)
                raise
            started = reply.started
            await coalescer.flush()
            if started:
                raise UpstreamError(
                    f"the model stream broke after output began: {last_error}"
                ) from last_error
            await self._sleep(self.config.stream_backoff_s * 2**attempt)
        raise UpstreamError(
            f"the model stream failed {self.config.stream_attempts} times: {last_error}"
        ) from last_error


def _trace_headers() -> dict[str, str]:
    """The request's W3C ``traceparent``, passed on to the model API (``hyperfleet.logs``)."""
    traceparent = logs.current().get("traceparent")
    return {"traceparent": traceparent} if traceparent else {}


def _log_call(request_id: str | None, model: str, took_s: float, message: ModelReply) -> None:
    usage = message.usage
    logger.info(
        "model call: %s in %.3f s, %d in / %d out tokens, %s",
        model,
        took_s,
        usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens,
        usage.output_tokens,
        message.stop_reason,
        extra={"model_request_id": request_id},
    )


def status_outcome(status_code: int, body: object) -> metrics.ModelCallOutcome:
    """A model call's outcome for an error status (200: an error event in the stream, whose
    ``error.type`` says which)."""
    if status_code == 200 and isinstance(body, dict):
        error = body.get("error", body)
        kind = error.get("type") if isinstance(error, dict) else None
        status_code = {"rate_limit_error": 429, "overloaded_error": 529}.get(str(kind), 500)
    if status_code == 429:
        return "rate_limit"
    if status_code == 529:
        return "overloaded"
    if 400 <= status_code < 500:
        return "refused"
    return "api_error"


@contextlib.contextmanager
def _metered(reply: ReplyAccumulator, meter: TurnMeter, model: str) -> Iterator[None]:
    """Gives ``meter`` (and the token metrics) the attempt's usage however it ends (finished,
    broken, cancelled by the turn's timeout); an attempt whose stream never started reported
    none and is not a call."""
    try:
        yield
    except asyncio.CancelledError:
        # Cut off (interrupted, or the turn's time limit): the stream's last count of output
        # tokens comes at its end, so what was streamed is estimated from its size instead.
        if reply.usage().output_tokens == 0 and reply.shown_chars():
            reply.estimate_output(-(-reply.shown_chars() // CHARS_PER_TOKEN))
        raise
    finally:
        usage = reply.usage()
        if usage != Usage():
            meter.add(usage)
            metrics.tokens_used(model, usage)
