"""A generator's outcomes in columns: one typed array a field, for the trip to the driver.

A distributed run sends every request's ``Outcome`` from its load generator (a Ray actor) to
the driver that builds the report: thousands to millions of them. Measured with 200,000 on
the development machine (2 busy cores, so roughly): pickled one object each they take 86
bytes an outcome, ~0.5 s to pickle in the generator and ~1 s to unpickle in the driver; as
columns (an ``array.array`` a field, which pickles as one buffer, strings as codes into one
table) 59 bytes, ~0.2 s to pack and pickle, and ~0.7 s to decode back into ``Outcome``s, the
one type the report reads (building those objects is most of it). So about 30 % less to ship
and half the generator's time; the driver's cost is the report's own.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from .report import Outcome

_NONE_STATUS = -1
_NONE_CODE = 0  # the string table's code for None


@dataclass(frozen=True)
class OutcomeColumns:
    """Outcomes field by field; row ``i`` of every column is outcome ``i``.

    Strings (error types, retry reasons) are codes into ``strings``, where 0 is None;
    an absent status is -1 and an absent time to first event NaN. A request's retries are
    ``retry_counts[i]`` consecutive entries of ``retry_at_s`` and ``retry_reasons``.
    """

    strings: tuple[str | None, ...]
    is_message: bytes
    ok: bytes
    tool_call: bytes
    start_s: array[float]
    end_s: array[float]
    ttft_s: array[float]
    cost_usd: array[float]
    status: array[int]
    error_type: array[int]
    input_tokens: array[int]
    output_tokens: array[int]
    cache_read_input_tokens: array[int]
    retry_counts: array[int]
    retry_at_s: array[float]
    retry_reasons: array[int]

    @classmethod
    def of(cls, outcomes: Iterable[Outcome]) -> OutcomeColumns:
        """Pack ``outcomes`` (in their order)."""
        codes: dict[str | None, int] = {None: _NONE_CODE}

        def code(text: str | None) -> int:
            return codes.setdefault(text, len(codes))

        is_message, ok, tool_call = bytearray(), bytearray(), bytearray()
        start, end, ttft, cost = array("d"), array("d"), array("d"), array("d")
        status, error_type = array("i"), array("I")
        tokens_in, tokens_out, cache_read = array("i"), array("i"), array("i")
        retry_counts, retry_at, retry_reasons = array("I"), array("d"), array("I")
        for o in outcomes:
            is_message.append(o.op == "message")
            ok.append(o.ok)
            tool_call.append(o.tool_call)
            start.append(o.start_s)
            end.append(o.end_s)
            ttft.append(math.nan if o.ttft_s is None else o.ttft_s)
            cost.append(o.cost_usd)
            status.append(_NONE_STATUS if o.status is None else o.status)
            error_type.append(code(o.error_type))
            tokens_in.append(o.input_tokens)
            tokens_out.append(o.output_tokens)
            cache_read.append(o.cache_read_input_tokens)
            retry_counts.append(len(o.retries))
            for at, reason in o.retries:
                retry_at.append(at)
                retry_reasons.append(code(reason))
        return cls(
            strings=tuple(codes),
            is_message=bytes(is_message),
            ok=bytes(ok),
            tool_call=bytes(tool_call),
            start_s=start,
            end_s=end,
            ttft_s=ttft,
            cost_usd=cost,
            status=status,
            error_type=error_type,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cache_read_input_tokens=cache_read,
            retry_counts=retry_counts,
            retry_at_s=retry_at,
            retry_reasons=retry_reasons,
        )

    def __len__(self) -> int:
        return len(self.start_s)

    def decode(self, shift_s: float = 0.0) -> list[Outcome]:
        """The outcomes back, every time in them moved ``shift_s`` later."""
        strings = self.strings
        retry_at, retry_reasons = self.retry_at_s, self.retry_reasons
        found: list[Outcome] = []
        at = 0
        rows = zip(
            self.is_message,
            self.start_s,
            self.end_s,
            self.ok,
            self.status,
            self.error_type,
            self.ttft_s,
            self.retry_counts,
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cost_usd,
            self.tool_call,
            strict=True,
        )
        for (
            message,
            start,
            end,
            ok,
            status,
            error,
            ttft,
            count,
            t_in,
            t_out,
            cached,
            cost,
            tool,
        ) in rows:
            retries: tuple[tuple[float, str], ...] = ()
            if count:
                retries = tuple(
                    (retry_at[j] + shift_s, strings[retry_reasons[j]] or "")
                    for j in range(at, at + count)
                )
                at += count
            found.append(
                Outcome(
                    "message" if message else "open_session",
                    start + shift_s,
                    end + shift_s,
                    bool(ok),
                    None if status == _NONE_STATUS else status,
                    strings[error],
                    None if math.isnan(ttft) else ttft,
                    retries,
                    t_in,
                    t_out,
                    cached,
                    cost,
                    bool(tool),
                )
            )
        return found
