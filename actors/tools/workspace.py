"""A session's workspace directory, and the one rule for paths: they stay inside it.

Paths are checked lexically and then opened one component at a time relative to the workspace
with ``O_NOFOLLOW``, so a symlink anywhere in the path is refused at the moment of opening, not
only when it was checked: a sandboxed ``bash`` racing a parallel ``write_file`` by swapping a
component for a link to ``/etc`` gets an error, never a host file. Final files are opened
non-blocking and must be regular files, so a FIFO or a device cannot hang the replica. When the
replica runs as root, what it creates belongs to the sandbox's unprivileged user.

A workspace may have a disk quota. No filesystem quota is available to an unprivileged design on
every node (project quotas need XFS or ext4 mounted for them; a loop device per session needs
mount rights and leaks on a crash), so usage is measured: ``usage`` walks the tree, never
following a link, and counts allocated blocks (a sparse file counts what it occupies) and entries.
``write_file`` refuses to go over the quota, and the sandbox (``sandbox.py``) measures while a
command runs and stops it when the workspace grows past the quota.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

SANDBOX_UID = 65534  # nobody: tools without network
EGRESS_UID = 65533  # tools with egress: their own uid, so the egress firewall can match them
SANDBOX_MOUNT = "/workspace"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Entries a workspace may hold: beyond it, walking it to measure it costs too much (and empty
# files would use up the node's inodes unmeasured).
MAX_WORKSPACE_ENTRIES = 100_000
MIB = 1024 * 1024


class PathEscapeError(ValueError):
    """A path that is, or goes through something, outside the workspace or a symlink."""


class QuotaError(OSError):
    """A write that would take the workspace over its disk quota."""


def sandbox_uid(egress: bool) -> int:
    return EGRESS_UID if egress else SANDBOX_UID


@dataclass(frozen=True)
class Usage:
    """What a workspace holds: allocated bytes and entries (counted up to a bound, then stopped:
    ``complete`` is False and both are at least what was counted)."""

    bytes: int
    entries: int
    complete: bool = True

    def over(self, quota_bytes: int | None) -> str | None:
        """Why this usage is over the quota (or the entry bound), else None."""
        if self.entries > MAX_WORKSPACE_ENTRIES:
            return f"the workspace holds over {MAX_WORKSPACE_ENTRIES} files and directories"
        if quota_bytes is not None and self.bytes > quota_bytes:
            used = f"{self.bytes / MIB:.1f} MiB" + ("" if self.complete else " or more")
            return f"the workspace uses {used}, over its disk quota of {quota_bytes / MIB:g} MiB"
        return None


class Workspace:
    def __init__(
        self, root: Path, uid: int = SANDBOX_UID, disk_quota_bytes: int | None = None
    ) -> None:
        self.root = root
        self.uid = uid  # the sandbox user that owns what is created here (when root)
        self.disk_quota_bytes = disk_quota_bytes  # None: no quota

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

    def usage(self, stop_above_bytes: int | None = None) -> Usage:
        """What the tree holds, walked without following links; the walk stops once it counted
        more than ``stop_above_bytes`` or ``MAX_WORKSPACE_ENTRIES`` (a tool may be filling it)."""
        total = entries = 0
        pending = [str(self.root)]
        while pending:
            try:
                scan = os.scandir(pending.pop())
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue  # removed meanwhile by a tool, or made unreadable by it (not as root)
            with scan:
                for entry in scan:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries += 1
                    total += info.st_blocks * 512
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(entry.path)
                    over_bytes = stop_above_bytes is not None and total > stop_above_bytes
                    if over_bytes or entries > MAX_WORKSPACE_ENTRIES:
                        return Usage(total, entries, complete=False)
        return Usage(total, entries)

    def check_room(self, adding_bytes: int) -> None:
        """Raises ``QuotaError`` unless ``adding_bytes`` more fit in the disk quota."""
        if self.disk_quota_bytes is None:
            return
        now = self.usage(self.disk_quota_bytes)
        after = Usage(now.bytes + adding_bytes, now.entries + 1, now.complete)
        reason = after.over(self.disk_quota_bytes)
        if reason is not None:
            raise QuotaError(f"refused: {reason} with this file; delete files to make room")

    def write(self, path: str, data: bytes) -> None:
        *dirs, name = self.parts(path) or [""]
        if not name:
            raise PathEscapeError("a file name is needed")
        self.check_room(len(data))
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


def remove_tree(root: Path) -> None:
    """Removes a workspace tree, or an agent's tree of them; a missing one is fine. A replica
    that is not root runs its tools as its own user, and a tool may leave directories that their
    owner cannot delete from (``chmod 500 d``): each directory is made writable again before it
    is emptied, never following a link. Whatever still resists is logged, not raised."""
    if not root.exists() or root.is_symlink():
        return
    with contextlib.suppress(OSError):
        os.chmod(root, 0o700)
    for path, dirs, _ in os.walk(root, topdown=True, followlinks=False):
        for name in dirs:  # before os.walk lists them
            child = os.path.join(path, name)
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(child).st_mode):
                    os.chmod(child, 0o700)
    shutil.rmtree(root, onerror=_not_removed)


def _not_removed(function: object, path: str, info: tuple[type, BaseException, object]) -> None:
    if not isinstance(info[1], FileNotFoundError):  # removed meanwhile: fine
        logger.warning("could not remove %s from a workspace: %s", path, info[1])


def _refused(part: str, error: OSError) -> Exception:
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        return PathEscapeError(f"{part!r} is a symlink or not a directory: refused")
    return error
