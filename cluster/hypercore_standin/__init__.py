"""A faithful local stand-in for a Hypercore host: same gRPC service, HTTP mirror, semantics and
error texts, with local process trees as workloads (see ``host`` for what is and is not
reproduced). The image catalog maps an ``image_ref`` to the argv a workload runs; the launcher
starts the stand-in as a process (for the tests, benchmarks and ``ray up`` on one machine).

A stand-in: no runtime module imports this package.
"""

from .catalog import CatalogError, Image, ImageCatalog
from .host import Host, HostError
from .launcher import StandinHandle, start_standin
from .server import DEFAULT_BASE_URL, DEFAULT_REFRESH_INTERVAL_S, StandinConfig, serve

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_REFRESH_INTERVAL_S",
    "CatalogError",
    "Host",
    "HostError",
    "Image",
    "ImageCatalog",
    "StandinConfig",
    "StandinHandle",
    "serve",
    "start_standin",
]
