"""The HTTP API on Ray Serve: users and keys, agents, sessions, streaming messages, limits.

The surface is imported lazily (PEP 562): every agent replica loads the control-store actor's
class (``serve_app.backend``) to meter its turns, and importing ``deployment`` here would pull
Ray Serve and FastAPI into each replica (about 1 s of CPU, at its first turn).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyperfleet.names import CONTROL_ACTOR_NAME

    from .backend import start_control_actor
    from .deployment import APP_NAME, IngressConfig, build

_SOURCES = {
    "APP_NAME": ".deployment",
    "CONTROL_ACTOR_NAME": "hyperfleet.names",
    "IngressConfig": ".deployment",
    "build": ".deployment",
    "start_control_actor": ".backend",
}

__all__ = ["APP_NAME", "CONTROL_ACTOR_NAME", "IngressConfig", "build", "start_control_actor"]


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
