"""The Serve deployment: a stateless Starlette ingress, any number of replicas, autoscaled."""

from __future__ import annotations

import logging
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from ray import serve
from starlette.applications import Starlette

from actors import RuntimeConfig
from autoscaling.pool_config import PoolConfig
from hyperfleet import logs

from .admission import ControlGate, Gate, RedisGate
from .app import Api
from .backend import HEAD_RESOURCE, Control
from .client_address import UVICORN_TRUST_ENV, ClientAddresses, ForwardedHeader, parse_networks
from .models import Quotas
from .replicas import Pool, Replicas
from .routes import build_app
from .tenancy import TenantPolicy

APP_NAME = "hyperfleet"

logger = logging.getLogger(__name__)


class IngressConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: RuntimeConfig
    # The per-address limit, and how the client's address is found (client_address.py,
    # docs/security.md): addresses exempt from it, proxies whose forwarding header is believed
    # (none by default) and which header they set, and the token HAProxy's shim vouches with.
    ip_requests_per_minute: int = Field(default=100, ge=1)
    ip_exempt: list[str] = Field(default_factory=list, max_length=1000)
    trusted_proxies: list[str] = Field(default_factory=list, max_length=1000)
    forwarded_header: ForwardedHeader = "x-forwarded-for"
    proxy_token: SecretStr | None = Field(default=None, min_length=16)
    # With Redis, admission runs in the ingress (limits and budgets in Redis): no Ray hop.
    redis_url: str | None = Field(default=None, pattern=r"^rediss?://")
    # What tenants' agents may ask for, and the quotas a new user gets unless its creator says.
    tenants: TenantPolicy = Field(default_factory=TenantPolicy)
    default_quotas: Quotas = Field(default_factory=Quotas)
    # Agent pools: the scaling defaults new agents take, the fleet's cap, the warm pool.
    pool: PoolConfig = Field(default_factory=PoolConfig)

    @field_validator("ip_exempt", "trusted_proxies")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        parse_networks(values, "each item")  # raises ValueError, which pydantic reports
        return values

    def client_addresses(self) -> ClientAddresses:
        token = self.proxy_token
        return ClientAddresses(
            trusted_proxies=parse_networks(self.trusted_proxies, "trusted_proxies"),
            exempt=parse_networks(self.ip_exempt, "ip_exempt"),
            forwarded_header=self.forwarded_header,
            proxy_token=None if token is None else token.get_secret_value(),
        )


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32},
    max_ongoing_requests=256,
    # On the head: Serve spreads replicas over nodes, and an ingress on an agent's VM would
    # share a tenant's VM (isolation vm) and keep it from ever going idle.
    ray_actor_options={"num_cpus": 0.25, "resources": {HEAD_RESOURCE: 0.001}},
)
@serve.ingress()
class Ingress:
    def __init__(self, config: dict[str, Any]) -> None:
        logs.configure("ingress")
        parsed = IngressConfig.model_validate(config)
        if os.environ.get(UVICORN_TRUST_ENV) != "":
            # Serve's uvicorn on this node replaces the TCP peer with X-Forwarded-For from the
            # hosts this lists (127.0.0.1 when unset): a local client picks its own address.
            logger.error(
                "%s is %r on this node, not empty: Serve's proxy may take a client's address "
                "from X-Forwarded-For before the per-address limit sees it (docs/security.md)",
                UVICORN_TRUST_ENV,
                os.environ.get(UVICORN_TRUST_ENV),
            )
        # Imported here: the controller's module loads Ray's autoscaler SDK, which the app
        # itself does not need.
        from autoscaling.pool_actor import start_pool_controller

        start_pool_controller(parsed.pool, parsed.runtime)  # or finds the one running
        control = Control()
        gate: Gate = (
            ControlGate(control)
            if parsed.redis_url is None
            else RedisGate(control, parsed.redis_url)
        )
        self.api = Api(
            control,
            Replicas(parsed.runtime),
            gate,
            parsed.ip_requests_per_minute,
            tenants=parsed.tenants,
            addresses=parsed.client_addresses(),
            default_quotas=parsed.default_quotas,
            pool=Pool(),
            pool_config=parsed.pool,
        )

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_app(self.api)


def app(args: dict[str, Any]) -> Any:
    """The application builder ``serve_config.yaml`` names (``serve deploy``)."""
    return build(args)


def build(config: dict[str, Any], num_replicas: int | None = None) -> Any:
    """The Serve application (for ``serve.run`` and ``serve deploy`` configs); a fixed
    ``num_replicas`` turns autoscaling off."""
    deployment: Any = Ingress
    if num_replicas is not None:
        deployment = Ingress.options(num_replicas=num_replicas, autoscaling_config=None)  # type: ignore[attr-defined]
    return deployment.bind(config)
