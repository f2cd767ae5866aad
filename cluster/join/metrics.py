"""What the join service measures, served at ``GET /metrics`` on the service's own port.

The service runs in its own process beside ``ray start --head``, not in Ray, so it uses
``prometheus_client`` with a registry of its own (one per app: nothing else in the process
leaks in, and each test's app counts from zero). Its port is already reachable from every node;
a second port would only be a second thing to bind, pass and restart. ``/metrics`` carries no
authentication, like Ray's own metrics ports: it shows counts by outcome, never a ticket, an
instance id or an address (``docs/join.md``).
"""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest


class JoinOutcome(StrEnum):
    """The ``outcome`` of one ``POST /v1/join``."""

    JOINED = "joined"  # 200: the token, sealed to the node's key
    INVALID = "invalid"  # 400, 413: a malformed or oversized request
    RATE_LIMITED = "rate_limited"  # 429: the address's bucket is empty
    REFUSED = "refused"  # 401, 403, 409, 410: signature, ticket or rejoin rules
    UNATTESTED = "unattested"  # 409 key_not_attested: no console of the instance shows the key
    UNAVAILABLE = "unavailable"  # 503: the GCS or the consoles cannot be asked now
    ERROR = "error"  # 500: a failure of the service itself


class JoinMetrics:
    """The join service's metrics, in a registry of their own."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._attempts = Counter(
            "hyperfleet_join_attempts",
            "Join requests answered by the head's join service, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in JoinOutcome:
            self._attempts.labels(outcome.value)  # every series from zero, so rate() sees a first

    def count(self, outcome: JoinOutcome) -> None:
        self._attempts.labels(outcome.value).inc()

    def render(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)
