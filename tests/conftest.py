"""Shared test helpers: free ports, and Ray's auth token for the whole test session.

Ray reads ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH`` and loopback's switch once per process,
when ``ray`` initialises its config, so they are set here, before any test module imports ``ray``.
The token is this session's own (not ``~/.ray/auth_token``), so tests never disturb other Ray
clusters on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from cluster.cli.servers import LOOPBACK_RAY_ENV

_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="hyperfleet-ray-token-"))
RAY_TOKEN_PATH = _TOKEN_DIR / "auth_token"
RAY_TOKEN_PATH.write_text(secrets.token_hex(32))
RAY_TOKEN_PATH.chmod(0o600)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(RAY_TOKEN_PATH)
# The session's head and this driver on 127.0.0.1 alone (see ``LOOPBACK_RAY_ENV``).
os.environ.update(LOOPBACK_RAY_ENV)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_TOKEN_DIR, ignore_errors=True)
