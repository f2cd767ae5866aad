"""Settings of the Anthropic API emulator: its latency model and its fault injection.

Every knob here can also be overridden per request by an ``x-emulator-*`` header (see
``scenario.py``), so one long-running emulator serves many test and benchmark scenarios.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Limits of the emulator itself, named once.
MAX_BODY_BYTES = 32 * 1024 * 1024  # the real API refuses bodies over 32 MB with 413
MAX_CACHE_ENTRIES = 50_000  # prompt-cache prefixes remembered (LRU)
DEFAULT_CACHE_TTL_S = 300.0  # "ephemeral" 5-minute cache
LONG_CACHE_TTL_S = 3600.0  # cache_control {"ttl": "1h"}
MAX_CACHE_BREAKPOINTS = 4
MAX_OUTPUT_WORDS = 4096  # upper bound of one generated reply, whatever max_tokens says


class EmulatorConfig(BaseModel):
    """How the emulator behaves. Fractions are of all requests, drawn from a seeded generator."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    api_key: str | None = Field(
        default=None, description="Only this x-api-key is accepted; None accepts any non-empty key."
    )
    seed: int = 0

    ttft_ms: float = Field(default=0.0, ge=0, description="Time to first token.")
    tps: float = Field(default=0.0, ge=0, description="Output tokens per second; 0 is unlimited.")
    jitter: float = Field(
        default=0.0, ge=0, le=1, description="Seeded +/- fraction applied to ttft_ms and tps."
    )
    delta_interval_ms: float = Field(
        default=20.0,
        ge=0,
        description="Streaming: text due within this window is sent as one content_block_delta.",
    )

    fault_429: float = Field(default=0.0, ge=0, le=1)
    fault_529: float = Field(default=0.0, ge=0, le=1)
    fault_500: float = Field(default=0.0, ge=0, le=1)
    fault_midstream: float = Field(default=0.0, ge=0, le=1)
    fault_drop: float = Field(default=0.0, ge=0, le=1)
    fault_after_events: int = Field(
        default=5, ge=1, description="Mid-stream faults strike after this many SSE events."
    )
    retry_after_ms: int = Field(default=1000, ge=0, description="Sent with 429 and 529 answers.")

    cache_min_tokens: int = Field(
        default=1024, ge=0, description="Shortest prefix the prompt cache stores (as Sonnet/Opus)."
    )
    output_words_min: int = Field(default=20, ge=1)
    output_words_max: int = Field(default=60, ge=1, le=MAX_OUTPUT_WORDS)

    @model_validator(mode="after")
    def _check(self) -> EmulatorConfig:
        total = self.fault_429 + self.fault_529 + self.fault_500
        total += self.fault_midstream + self.fault_drop
        if total > 1:
            raise ValueError(f"fault fractions add up to {total:.3f}, more than 1")
        if self.output_words_min > self.output_words_max:
            raise ValueError("output_words_min is larger than output_words_max")
        return self
