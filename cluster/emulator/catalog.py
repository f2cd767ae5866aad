"""The models the emulator answers for, as ``GET /v1/models`` lists them.

Requests for a model outside the catalog are refused with 404 ``not_found_error`` unless the id
starts with ``claude-``: clients such as Claude Code move to new model ids faster than any catalog.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    id: str
    display_name: str
    created_at: str
    max_output_tokens: int


# The models the official SDK (anthropic 2.13) lists, newest first.
CATALOG: tuple[ModelInfo, ...] = (
    ModelInfo("claude-opus-5-5", "Claude Opus 5.5", "2026-10-01T00:00:00Z", 128_000),
    ModelInfo("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-10-01T00:00:00Z", 128_000),
    ModelInfo("claude-haiku-5-5", "Claude Haiku 5.5", "2026-10-01T00:00:00Z", 64_000),
    ModelInfo("claude-opus-5", "Claude Opus 5", "2026-06-01T00:00:00Z", 128_000),
    ModelInfo("claude-sonnet-5", "Claude Sonnet 5", "2026-06-01T00:00:00Z", 128_000),
    ModelInfo("claude-opus-4-8", "Claude Opus 4.8", "2026-04-01T00:00:00Z", 128_000),
    ModelInfo("claude-opus-4-7", "Claude Opus 4.7", "2026-03-01T00:00:00Z", 128_000),
    ModelInfo("claude-opus-4-6", "Claude Opus 4.6", "2026-02-01T00:00:00Z", 128_000),
    ModelInfo("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-01T00:00:00Z", 64_000),
    ModelInfo("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-01T00:00:00Z", 64_000),
    ModelInfo("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z", 64_000),
    ModelInfo("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", 64_000),
)

ALIASES: dict[str, str] = {
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
}

_BY_ID = {m.id: m for m in CATALOG}
_UNLISTED_MAX_OUTPUT_TOKENS = 128_000


def resolve(model: str) -> ModelInfo | None:
    """The catalog entry a request's ``model`` names, or None when the API would answer 404."""
    found = _BY_ID.get(ALIASES.get(model, model))
    if found is not None:
        return found
    if model.startswith("claude-"):
        return ModelInfo(model, model, "2026-01-01T00:00:00Z", _UNLISTED_MAX_OUTPUT_TOKENS)
    return None
