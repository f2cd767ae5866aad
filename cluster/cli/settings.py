"""Hyperfleet's settings, read from the environment once, at the edge."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class Settings(BaseModel):
    """Where local state lives and which Anthropic endpoint agents talk to.

    ``HYPERFLEET_HOME`` (default ``~/.hyperfleet``) holds logs, pid files and generated keys.
    With ``ANTHROPIC_API_KEY`` set, agents talk to the real API (or ``ANTHROPIC_BASE_URL``);
    without it, the local stack starts the emulator and agents talk to that.
    ``HYPERFLEET_REDIS_URL`` names an external Redis; ``HYPERFLEET_REDIS=off`` keeps the stack on
    its SQLite stores even where ``redis-server`` is installed.
    """

    model_config = ConfigDict(frozen=True)

    home: Path
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    # An external Redis for admission and the session store; else the stack starts a local
    # redis-server when one is installed, unless HYPERFLEET_REDIS=off.
    redis_url: str | None = Field(default=None, pattern=r"^rediss?://[^\s]+$")
    local_redis: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = env.get("HYPERFLEET_HOME") or str(Path.home() / ".hyperfleet")
        key = env.get("ANTHROPIC_API_KEY") or None
        return cls(
            home=Path(home).expanduser(),
            anthropic_api_key=SecretStr(key) if key else None,
            anthropic_base_url=env.get("ANTHROPIC_BASE_URL") or None,
            redis_url=env.get("HYPERFLEET_REDIS_URL") or None,
            local_redis=env.get("HYPERFLEET_REDIS", "on") != "off",
        )

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"
