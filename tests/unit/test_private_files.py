"""State, keys and logs are the owner's alone: every file 0600 and every folder 0700, under the
usual 022 umask, whether the stack creates them or an older version left them wider."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.store import SqliteSessionStore
from actors.store.base import SessionRecord
from cluster.cli import stack
from cluster.cli.daemon import Daemons
from cluster.cli.settings import Settings
from hyperfleet.private import PRIVATE_UMASK
from hyperfleet.processes import spawn
from serve_app.control import ControlStore


@pytest.fixture(autouse=True)
def _usual_umask() -> Iterator[None]:
    """The umask most machines have: without the fix, new files are 0644 and folders 0755."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    """Each path under ``root`` (``root`` itself as "."), with its mode in octal."""
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def _assert_private(root: Path) -> None:
    modes = _modes(root)
    wide = {
        name: mode
        for name, mode in modes.items()
        if mode != (oct(0o700) if (root / name).is_dir() else oct(0o600))
    }
    assert wide == {}, modes


def test_the_stores_create_their_files_private(tmp_path: Path) -> None:
    data = tmp_path / "home" / "data"
    control = ControlStore(data / "control.db")
    control.create_user("usr_a", "a", {})
    control.create_agent("agt_a", "usr_a", '{"anthropic_api_key": "sk-ant-x"}', 1, 10)
    sessions = SqliteSessionStore(data / "sessions.db")
    record = SessionRecord("ses_a", "agt_a", "usr_a", 0.0)
    asyncio.run(sessions.create_session(record))
    names = {p.name for p in data.iterdir()}
    # The WAL files exist while the stores are open: they are what a reader would copy.
    assert {"control.db-wal", "control.db-shm", "sessions.db-wal", "sessions.db-shm"} <= names
    assert {"control.secret", "control.sealing-key"} <= names
    _assert_private(tmp_path / "home")
    control.close()
    sessions.close()


def test_a_store_tightens_what_an_older_version_left_readable(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    ControlStore(path).close()
    for name in ("control.db", "control.secret", "control.db-wal"):
        (tmp_path / name).touch()
        (tmp_path / name).chmod(0o644)
    ControlStore(path).close()
    _assert_private(tmp_path)


def test_daemons_write_private_pid_files_and_logs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    daemons = Daemons(home / "run", home / "logs")
    started = daemons.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert (home / "run" / "sleeper.json").exists() and started.log.exists()
        _assert_private(home)
    finally:
        daemons.stop("sleeper", grace_s=5)


def test_a_server_started_with_the_private_umask_writes_private_files(tmp_path: Path) -> None:
    data = tmp_path / "redis-like"
    data.mkdir(mode=0o700)
    script = (
        "import os; os.mkdir('appendonlydir'); "
        "open('appendonlydir/appendonly.aof.1.incr.aof', 'w').write('SET k v')"
    )
    child = spawn(
        [sys.executable, "-c", f"import os; os.chdir({str(data)!r}); {script}"],
        log=data / "server.log",
        umask=PRIVATE_UMASK,
    )
    assert child.wait(timeout=30) == 0
    _assert_private(data)


def test_up_makes_the_home_private_and_tightens_an_older_one(tmp_path: Path) -> None:
    settings = Settings.from_env({"HYPERFLEET_HOME": str(tmp_path / "home")})
    home = settings.home
    # What an older version left: a 0755 home and folders, 0644 keys, logs and Redis files.
    for folder in ("data/redis/appendonlydir", "logs", "run", "hypercore/w1"):
        (home / folder).mkdir(parents=True, mode=0o755)
    for name in ("admin.key", "stack.json", "logs/ray-head.log", "run/redis.json"):
        (home / name).write_text("x")
    (home / "data/redis/appendonlydir/appendonly.aof.1.base.rdb").write_text("x")
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    stack.private_home(settings)
    assert stack.ray_env(settings)["RAY_AUTH_TOKEN_PATH"] == str(home / "ray_auth_token")
    hypercore = home / "hypercore" / "w1"
    assert stat.S_IMODE(hypercore.stat().st_mode) == 0o755  # not the stack's: not walked
    shutil.rmtree(home / "hypercore")
    _assert_private(home)
