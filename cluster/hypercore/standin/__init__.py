"""A faithful local stand-in for a Hypercore host: same gRPC service, HTTP mirror, semantics and
error texts, with local process trees as workloads (see ``host`` for what is and is not
reproduced)."""

from .host import Host, HostError
from .server import DEFAULT_BASE_URL, DEFAULT_REFRESH_INTERVAL_S, StandinConfig, serve

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_REFRESH_INTERVAL_S",
    "Host",
    "HostError",
    "StandinConfig",
    "serve",
]
