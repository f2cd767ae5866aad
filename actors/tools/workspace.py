"""A session's workspace directory, and the one rule for paths: they stay inside it.

Paths are resolved with symlinks followed, so a link planted by a tool that points outside (say at
``/etc`` or Ray's session directory) is refused like ``../..`` is. When the replica runs as root,
the directory belongs to the sandbox's unprivileged user, so sandboxed tools can write to it and
nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

SANDBOX_UID = 65534  # nobody
SANDBOX_GID = 65534  # nogroup
SANDBOX_MOUNT = "/workspace"


class PathEscapeError(ValueError):
    """A path that resolves outside the workspace."""


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def owned_by_sandbox(self) -> bool:
        return os.geteuid() == 0

    def create(self) -> None:
        self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.owned_by_sandbox:
            os.chown(self.root, SANDBOX_UID, SANDBOX_GID)

    def resolve(self, path: str) -> Path:
        """The real path of ``path`` (relative, or absolute under /workspace) inside the root."""
        if path.startswith(SANDBOX_MOUNT + "/") or path == SANDBOX_MOUNT:
            path = path[len(SANDBOX_MOUNT) :].lstrip("/") or "."
        if "\x00" in path:
            raise PathEscapeError("path contains a NUL byte")
        root = self.root.resolve()
        target = (root / path).resolve()
        if target != root and not target.is_relative_to(root):
            raise PathEscapeError(f"{path!r} is outside the session workspace")
        return target

    def give_to_sandbox(self, path: Path) -> None:
        """Hands a file the replica created to the sandbox user (no-op unless running as root)."""
        if self.owned_by_sandbox:
            os.chown(path, SANDBOX_UID, SANDBOX_GID)
