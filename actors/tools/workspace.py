"""A session's workspace directory, and the one rule for paths: they stay inside it.

Paths are checked lexically and then opened one component at a time relative to the workspace
with ``O_NOFOLLOW``, so a symlink anywhere in the path is refused at the moment of opening, not
only when it was checked: a sandboxed ``bash`` racing a parallel ``write_file`` by swapping a
component for a link to ``/etc`` gets an error, never a host file. Final files are opened
non-blocking and must be regular files, so a FIFO or a device cannot hang the replica. When the
replica runs as root, what it creates belongs to the sandbox's unprivileged user.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

SANDBOX_UID = 65534  # nobody: tools without network
EGRESS_UID = 65533  # tools with egress: their own uid, so the egress firewall can match them
SANDBOX_MOUNT = "/workspace"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathEscapeError(ValueError):
    """A path that is, or goes through something, outside the workspace or a symlink."""


def sandbox_uid(egress: bool) -> int:
    return EGRESS_UID if egress else SANDBOX_UID


class Workspace:
    def __init__(self, root: Path, uid: int = SANDBOX_UID) -> None:
        self.root = root
        self.uid = uid  # the sandbox user that owns what is created here (when root)

    @property
    def owned_by_sandbox(self) -> bool:
        return os.geteuid() == 0

    def create(self) -> None:
        self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.owned_by_sandbox:
            os.chown(self.root, self.uid, self.uid)

    def parts(self, path: str) -> list[str]:
        """The components of ``path`` (relative, or absolute under /workspace) inside the root."""
        if path == SANDBOX_MOUNT or path.startswith(SANDBOX_MOUNT + "/"):
            path = path[len(SANDBOX_MOUNT) + 1 :] or "."
        if "\x00" in path:
            raise PathEscapeError("path contains a NUL byte")
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts:
            raise PathEscapeError(f"{path!r} is outside the session workspace")
        return [p for p in pure.parts if p not in ("", ".")]

    def resolve(self, path: str) -> Path:
        """The path inside the root (lexically checked; opening re-checks every component)."""
        return self.root.joinpath(*self.parts(path))

    @contextmanager
    def open_dir(self, parts: list[str], create: bool = False) -> Iterator[int]:
        """A descriptor of the directory ``parts``, walked without following any symlink."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts:
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if self.owned_by_sandbox:
                        os.chown(part, self.uid, self.uid, dir_fd=fd, follow_symlinks=False)
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise _refused(part, e) from e
                os.close(fd)
                fd = next_fd
            yield fd
        finally:
            os.close(fd)

    def read(self, path: str, limit: int) -> bytes:
        """At most ``limit`` bytes of a regular file."""
        *dirs, name = self.parts(path) or ["."]
        with self.open_dir(dirs) as dir_fd:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError as e:
                raise _refused(name, e) from e
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PathEscapeError(f"{path!r} is not a regular file")
                chunks, size = [], 0
                while size < limit and (chunk := os.read(fd, min(65536, limit - size))):
                    chunks.append(chunk)
                    size += len(chunk)
                return b"".join(chunks)
            finally:
                os.close(fd)

    def write(self, path: str, data: bytes) -> None:
        *dirs, name = self.parts(path) or [""]
        if not name:
            raise PathEscapeError("a file name is needed")
        with self.open_dir(dirs, create=True) as dir_fd:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
            try:
                fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
            except OSError as e:
                raise _refused(name, e) from e
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PathEscapeError(f"{path!r} is not a regular file")
                if self.owned_by_sandbox:
                    os.fchown(fd, self.uid, self.uid)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

    def list(self, path: str) -> list[tuple[str, bool, int]]:
        """(name, is_dir, size) of a directory's entries, sorted; links are not followed."""
        with self.open_dir(self.parts(path)) as fd:
            entries = []
            for name in sorted(os.listdir(fd)):
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile by a tool
                entries.append((name, stat.S_ISDIR(info.st_mode), info.st_size))
            return entries


def _refused(part: str, error: OSError) -> Exception:
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        return PathEscapeError(f"{part!r} is a symlink or not a directory: refused")
    return error
