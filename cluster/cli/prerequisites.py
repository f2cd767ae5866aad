"""What ``hyperfleet up`` uses from the machine beyond Python, and what it says when one is missing.

None of these stops ``up``: without them the stack still starts, with less. But a newcomer should
hear what is missing, what that costs and how to get it before it starts, not meet it later as a
failed tool call or a slower path that nothing explained.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from .settings import Settings

Which = Callable[[str], str | None]


@dataclass(frozen=True)
class Prerequisite:
    """Programs from one Debian package, and what the stack does without them."""

    binaries: tuple[str, ...]
    package: str
    without: str

    def warning(self, missing: list[str]) -> str:
        return (
            f"warning: {' and '.join(missing)} not installed: {self.without}. "
            f"Install it (Debian, Ubuntu; as root): apt-get install -y {self.package}"
        )


REDIS = Prerequisite(
    ("redis-server",),
    "redis-server",
    "the stack takes the slower SQLite path (each request's admission is a call into the one "
    "control-store actor)",
)
BUBBLEWRAP = Prerequisite(
    ("bwrap",), "bubblewrap", "agents' bash and other shell tools will fail (no tool sandbox)"
)
PROMETHEUS = Prerequisite(
    ("prometheus",),
    "prometheus",
    "no metrics are kept: the Ray dashboard's Metrics view and Grafana have no data, and no "
    "alert is evaluated",
)
IPTABLES = Prerequisite(
    ("iptables", "ip6tables"),
    "iptables",
    "tools of agents with egress will fail (their firewall cannot be set up)",
)


def missing_prerequisites(
    settings: Settings, which: Which = shutil.which, is_root: bool | None = None
) -> list[str]:
    """A warning line for each prerequisite that ``which`` does not find, in the order that
    matters to a newcomer. Redis only when the stack would start its own; iptables only as
    root, since tool egress needs root anyway."""
    wanted = [BUBBLEWRAP, PROMETHEUS]
    if settings.redis_url is None and settings.local_redis:
        wanted.insert(0, REDIS)
    if os.geteuid() == 0 if is_root is None else is_root:
        wanted.append(IPTABLES)
    lines = []
    for prerequisite in wanted:
        missing = [b for b in prerequisite.binaries if which(b) is None]
        if missing:
            lines.append(prerequisite.warning(missing))
    return lines
