"""The Serve deployment: a stateless Starlette ingress, any number of replicas, autoscaled."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.applications import Starlette

from actors import RuntimeConfig

from .admission import ControlGate, Gate, RedisGate
from .app import Api
from .backend import Control, Replicas
from .models import Quotas
from .routes import build_app
from .tenancy import TenantPolicy

APP_NAME = "hyperfleet"


class IngressConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: RuntimeConfig
    ip_requests_per_minute: int = Field(default=100, ge=1)
    # With Redis, admission runs in the ingress (limits and budgets in Redis): no Ray hop.
    redis_url: str | None = Field(default=None, pattern=r"^rediss?://")
    # What tenants' agents may ask for, and the quotas a new user gets unless its creator says.
    tenants: TenantPolicy = Field(default_factory=TenantPolicy)
    default_quotas: Quotas = Field(default_factory=Quotas)


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32},
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress()
class Ingress:
    def __init__(self, config: dict[str, Any]) -> None:
        parsed = IngressConfig.model_validate(config)
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
            default_quotas=parsed.default_quotas,
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
