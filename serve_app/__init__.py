"""The HTTP API on Ray Serve: users and keys, agents, sessions, streaming messages, limits."""

from __future__ import annotations

from .backend import CONTROL_ACTOR_NAME, start_control_actor
from .deployment import APP_NAME, IngressConfig, build

__all__ = ["APP_NAME", "CONTROL_ACTOR_NAME", "IngressConfig", "build", "start_control_actor"]
