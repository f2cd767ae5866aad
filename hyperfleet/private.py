"""Files only their owner may read: Hyperfleet's state, keys and logs.

Every state, key and log file Hyperfleet writes is created 0600, and every folder of them 0700,
by the mode given to the ``open`` or ``mkdir`` that creates it rather than by a chmod afterwards,
so there is no moment at which another local user could open it. A file or folder that an older
version created with the umask's mode (0644 and 0755 under the usual 022) is tightened when it
is next opened (``tighten``).

SQLite creates a database's ``-wal`` and ``-shm`` files with the mode of the database file, so
creating the database file 0600 before ``sqlite3.connect`` covers them too (a chmod after the
connect would leave them at the umask's mode): ``private_database``. Servers that write files of
their own (redis-server) are started with a 077 umask instead (``processes.spawn``'s ``umask``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
PRIVATE_UMASK = 0o077  # for a child process whose own files must be private
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def tighten(path: Path, mode: int) -> None:
    """Takes away the permission bits beyond ``mode`` (group's and others') from an existing
    ``path``; a missing one is left missing."""
    with contextlib.suppress(FileNotFoundError):
        current = stat.S_IMODE(path.stat().st_mode)
        if current & ~mode:
            path.chmod(current & mode)


def make_private_dirs(path: Path) -> Path:
    """Creates the missing folders of ``path`` (the last one included), each 0700; folders that
    exist are left as they are (they may be shared, as /tmp is). Returns ``path``."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            folder.mkdir(mode=DIR_MODE)
    return path


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner may open: created 0700 with its missing parents, or
    tightened to 0700 if it exists. Only for folders that are Hyperfleet's own."""
    make_private_dirs(path)
    tighten(path, DIR_MODE)
    return path


def private_tree(path: Path) -> Path:
    """``private_dir(path)``, and every file below it tightened to 0600 and every folder to
    0700: for a folder that is Hyperfleet's own through and through (its logs, a server's data)
    and that an older version may have filled with the umask's modes."""
    private_dir(path)
    for root, folders, files in os.walk(path):
        for name in folders:
            tighten(Path(root, name), DIR_MODE)
        for name in files:
            tighten(Path(root, name), FILE_MODE)
    return path


def open_private(path: Path, flags: int) -> int:
    """``os.open`` of ``path`` with ``O_CREAT``: created 0600, or tightened to 0600 if it
    existed. Its missing folders are created 0700. Returns the descriptor."""
    make_private_dirs(path.parent)
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & ~FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode through O_CREAT
    except OSError:
        os.close(fd)
        raise
    return fd


def private_database(path: Path) -> Path:
    """Prepares a SQLite database at ``path`` to be private before ``sqlite3.connect`` opens
    it: the file created (or tightened to) 0600, so SQLite creates its -wal and -shm files 0600,
    and siblings that an older version left wider tightened. Returns ``path``."""
    os.close(open_private(path, os.O_RDWR))
    for suffix in SQLITE_SIDECARS:
        tighten(path.with_name(path.name + suffix), FILE_MODE)
    return path


def write_private(path: Path, data: bytes | str) -> None:
    """Replaces ``path`` with ``data``, 0600 from its first byte: written to a temporary file in
    the same folder, then renamed over it (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def create_private(path: Path, data: bytes | str) -> bool:
    """Creates ``path`` with ``data``, 0600, unless it exists; True if this call created it.
    Two processes racing to create it: one wins, and the other reads the winner's."""
    make_private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        tighten(path, FILE_MODE)
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return True
