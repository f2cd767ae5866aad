"""List prices per model, in USD per million tokens: the one place cost is computed from.

Cache writes cost 1.25x input for the 5-minute TTL and 2x for the 1-hour TTL; cache reads 0.1x.
A model missing from the table is priced as the most expensive one, so budgets err on the safe
side rather than metering a turn as free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float


PRICES: dict[str, Price] = {
    "claude-opus-5-5": Price(4.0, 20.0),
    "claude-opus-5": Price(5.0, 25.0),
    "claude-opus-4-8": Price(5.0, 25.0),
    "claude-opus-4-7": Price(5.0, 25.0),
    "claude-opus-4-6": Price(5.0, 25.0),
    "claude-opus-4-5": Price(5.0, 25.0),
    "claude-sonnet-5-5": Price(3.0, 15.0),
    "claude-sonnet-5": Price(3.0, 15.0),
    "claude-sonnet-4-6": Price(3.0, 15.0),
    "claude-sonnet-4-5": Price(3.0, 15.0),
    "claude-haiku-5-5": Price(1.0, 5.0),
    "claude-haiku-4-5": Price(1.0, 5.0),
}
_FALLBACK = max(PRICES.values(), key=lambda p: p.output_per_mtok)
CACHE_WRITE_5M = 1.25
CACHE_WRITE_1H = 2.0
CACHE_READ = 0.1


def price_of(model: str) -> Price:
    """The price of a model id, dated ids (``claude-haiku-4-5-20251001``) included."""
    if model in PRICES:
        return PRICES[model]
    for name, price in PRICES.items():
        if model.startswith(name + "-"):
            return price
    return _FALLBACK


@dataclass(frozen=True)
class Usage:
    """Tokens of one model call or one turn; adds up."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_creation_1h_input_tokens + other.cache_creation_1h_input_tokens,
        )

    def cost_usd(self, model: str) -> float:
        price = price_of(model)
        per_input = price.input_per_mtok / 1e6
        writes_5m = self.cache_creation_input_tokens - self.cache_creation_1h_input_tokens
        cost = self.input_tokens * per_input
        cost += self.output_tokens * price.output_per_mtok / 1e6
        cost += self.cache_read_input_tokens * per_input * CACHE_READ
        cost += writes_5m * per_input * CACHE_WRITE_5M
        cost += self.cache_creation_1h_input_tokens * per_input * CACHE_WRITE_1H
        return round(cost, 8)

    def to_json(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
        }

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Usage:
        return cls(
            data.get("input_tokens", 0),
            data.get("output_tokens", 0),
            data.get("cache_read_input_tokens", 0),
            data.get("cache_creation_input_tokens", 0),
        )
