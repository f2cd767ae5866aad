"""Pricing, the circuit breaker and text coalescing, with injected clocks."""

from __future__ import annotations

import pytest

from actors import CircuitBreaker, CircuitOpenError, Usage, price_of


def test_price_lookup_and_cost() -> None:
    assert price_of("claude-haiku-4-5-20251001") == price_of("claude-haiku-4-5")
    assert price_of("claude-unknown-9") == max(
        (price_of(m) for m in ("claude-opus-5", "claude-sonnet-5")), key=lambda p: p.output_per_mtok
    )
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert usage.cost_usd("claude-sonnet-5-5") == pytest.approx(18.0)
    cached = Usage(cache_read_input_tokens=1_000_000, cache_creation_input_tokens=1_000_000)
    assert cached.cost_usd("claude-sonnet-5-5") == pytest.approx(0.3 + 3.75)
    total = usage + cached
    assert total.to_json()["cache_read_input_tokens"] == 1_000_000
    assert Usage.from_json(total.to_json()) == Usage(1_000_000, 1_000_000, 1_000_000, 1_000_000)


def test_breaker_opens_fails_fast_and_half_opens() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=lambda: now[0])
    for _ in range(3):
        breaker.check()
        breaker.record_failure()
    assert breaker.state == "open"
    now[0] = 4.0
    with pytest.raises(CircuitOpenError) as info:
        breaker.check()
    assert info.value.retry_after_s == pytest.approx(6.0)
    now[0] = 10.0
    breaker.check()  # the half-open trial
    with pytest.raises(CircuitOpenError):
        breaker.check()  # only one trial at a time
    breaker.record_failure()
    assert breaker.state == "open"
    now[0] = 29.0  # a failed trial doubles the cool-down: 20 s from the trial
    with pytest.raises(CircuitOpenError) as info:
        breaker.check()
    assert info.value.retry_after_s == pytest.approx(1.0)
    now[0] = 30.0
    breaker.check()
    breaker.record_failure()
    now[0] = 59.0  # doubled again, but never past max_cooldown_s (30 s)
    with pytest.raises(CircuitOpenError):
        breaker.check()
    now[0] = 60.0
    breaker.check()
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.check()
    for _ in range(3):  # a success starts over: the next opening cools down for 10 s again
        breaker.record_failure()
    now[0] = 70.0
    assert breaker.state == "half_open"


def test_breaker_counts_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=2)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_errors_say_whether_a_resend_may_pass_and_keep_it_across_processes() -> None:
    """A stream's error event carries ``retryable``: a failed model call may pass on a resend,
    a request the model API refused (4xx) would be refused again."""
    import pickle

    from hyperfleet.errors import TurnTimeoutError, UpstreamError, UpstreamRefusedError

    failed = pickle.loads(pickle.dumps(UpstreamError("failed")))  # noqa: S301 - our own bytes
    refused = pickle.loads(pickle.dumps(UpstreamRefusedError("no")))  # noqa: S301 - our own bytes
    assert failed.to_json()["retryable"] is True and failed.status_code == 502
    assert type(refused) is UpstreamRefusedError and refused.to_json()["retryable"] is False
    assert TurnTimeoutError("too long").to_json()["retryable"] is False
    assert CircuitOpenError("open", retry_after_s=2.0).to_json() == {
        "type": "circuit_open",
        "message": "open",
        "retryable": True,
        "retry_after_s": 2.0,
    }


def test_a_late_failure_of_a_call_in_flight_does_not_push_the_trial_back() -> None:
    """Calls already running when the breaker opened may fail afterwards: they move neither
    the opening time nor the cool-down, so the half-open trial comes when it was due."""
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=lambda: now[0])
    breaker.record_failure(trial=False)
    breaker.record_failure(trial=False)  # opens at 0
    now[0] = 8.0
    breaker.record_failure(trial=False)  # a call sent before it opened, failing late
    now[0] = 10.0
    assert breaker.state == "half_open"
    assert breaker.check() is True  # the trial, on time
