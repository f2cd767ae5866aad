"""``hyperfleet up`` / ``agents`` / ``chat`` / ``status`` / ``down`` as a user runs them, with real
processes, and the README's curl conversation run as written."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hyperfleet.processes import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT_S = 180


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "RAY_AUTH"))}
    env["HYPERFLEET_HOME"] = str(home)
    if api_url:
        env["HYPERFLEET_URL"] = api_url
    return env


def _hyperfleet(
    home: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        env=_env(home),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _wider_than_private(home: Path) -> dict[str, str]:
    """Each file under ``home`` that is not 0600 and each folder that is not 0700, with its mode
    (the stack's state, keys, logs, pid files, databases with their WAL, Redis's files); the
    HAProxy wrapper is 0700, its owner's alone too."""
    wide = {}
    for path in [home, *home.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (0o700 if path.is_dir() or path == home / "bin" / "haproxy" else 0o600):
            wide[str(path.relative_to(home))] = oct(mode)
    return wide


def _curl_block() -> str:
    match = re.search(
        r"<!-- curl-conversation -->\s*```sh\n(.*?)```", README.read_text(), re.DOTALL
    )
    assert match, "README lost its curl conversation"
    return match.group(1)


@pytest.mark.timeout(400)
def test_up_chat_curl_status_down(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = [str(free_port()) for _ in range(4)]
    flags = ["--port", ports[0], "--emulator-port", ports[1], "--ray-port", ports[2]]
    flags += ["--redis-port", ports[3]]
    up = _hyperfleet(home, "up", *flags)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api_url = f"http://127.0.0.1:{ports[0]}"
        assert f"Hyperfleet API: {api_url}" in up.stdout
        key_file = home / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_text().strip() in up.stdout
        assert f"redis-server on 127.0.0.1:{ports[3]}" in up.stdout  # installed here
        assert "warning:" not in up.stdout  # every prerequisite is installed here
        again = _hyperfleet(home, "up", *flags)
        assert again.returncode == 0, again.stderr
        assert key_file.read_text().strip() in again.stdout  # the same admin, not a new one

        created = _hyperfleet(home, "agents", "create", "--tool", "bash")
        assert created.returncode == 0, created.stderr
        agent_id = json.loads(created.stdout)["id"]
        assert agent_id in _hyperfleet(home, "agents", "list").stdout
        chat = _hyperfleet(
            home, "chat", agent_id, stdin='Hello there\n[[tool bash {"command": "echo chat-ok"}]]\n'
        )
        assert chat.returncode == 0, chat.stderr
        assert "agent> You said: Hello there." in chat.stdout
        assert "[tool bash" in chat.stdout and "[result] chat-ok" in chat.stdout
        assert "(end_turn;" in chat.stdout

        curl = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _curl_block()],
            env=_env(home, api_url),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert curl.returncode == 0, curl.stderr
        assert "You said: Hello!" in curl.stdout
        assert "event: tool_result" in curl.stdout and "hello from the sandbox" in curl.stdout
        assert '"version":2' in curl.stdout.replace(" ", "")
        assert '"turns"' in curl.stdout and '"cost_usd"' in curl.stdout

        status = json.loads(_hyperfleet(home, "status").stdout)
        assert status["api"]["healthy"] is True
        # While everything runs and has written: SQLite's WAL files, Redis's append-only files.
        assert {"control.db-wal", "sessions.db"} <= {p.name for p in (home / "data").iterdir()}
        assert any((home / "data" / "redis").rglob("*.aof"))
        assert _wider_than_private(home) == {}
        assert status["ray-head"]["running"] and status["emulator"]["running"]
        assert status["redis"]["running"]
        deleted = _hyperfleet(home, "agents", "delete", agent_id)
        assert json.loads(deleted.stdout)["status"] == "deleted"
    finally:
        down = _hyperfleet(home, "down")
    assert down.returncode == 0 and "stopped the Ray head" in down.stdout
    after = json.loads(_hyperfleet(home, "status").stdout)
    assert not after["ray-head"]["running"] and not after["emulator"]["running"]
    assert not after["redis"]["running"]


def test_cli_client_errors_are_clear(tmp_path: Path) -> None:
    missing = _hyperfleet(tmp_path, "agents", "list")
    assert missing.returncode == 1 and "no API key" in missing.stderr
    (tmp_path / "admin.key").write_text("hf_x_y")
    env_url = _env(tmp_path, f"http://127.0.0.1:{free_port()}")
    unreachable = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "agents", "list"],
        env=env_url,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def _statuses(url: str, source: str, n: int, spoof: bool = False) -> list[int]:
    """``n`` keyless requests from ``source``; with ``spoof``, each claims another address in
    every header a client could think of."""
    transport = httpx.HTTPTransport(local_address=source)
    statuses = []
    with httpx.Client(transport=transport, timeout=30) as client:
        for i in range(n):
            claimed = f"198.51.100.{i + 1}"
            headers = {
                "X-Forwarded-For": claimed,
                "Forwarded": f"for={claimed}",
                "X-Hyperfleet-Peer": claimed,
                "X-Hyperfleet-Proxy-Token": "guess",
            }
            statuses.append(client.get(url, headers=headers if spoof else None).status_code)
    return statuses


@pytest.mark.timeout(300)
def test_up_limits_each_client_address_behind_haproxy(tmp_path: Path) -> None:
    """Each loopback source address is a client of its own behind Serve's HAProxy (the default
    ingress); no header moves a request to another window; an exempt address has none."""
    home = tmp_path / "home"
    ports = [str(free_port()) for _ in range(4)]
    flags = ["--port", ports[0], "--emulator-port", ports[1], "--ray-port", ports[2]]
    flags += ["--redis-port", ports[3], "--ip-requests-per-minute", "5"]
    flags += ["--ip-exempt", "127.0.0.4/32, 2001:db8::/32"]
    up = _hyperfleet(home, "up", *flags)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{ports[0]}/v1/usage"
        assert _statuses(url, "127.0.0.2", 6) == [401] * 5 + [429]
        assert _statuses(url, "127.0.0.3", 6, spoof=True) == [401] * 5 + [429]
        assert _statuses(url, "127.0.0.2", 1, spoof=True) == [429]
        assert _statuses(url, "127.0.0.4", 8, spoof=True) == [401] * 8
    finally:
        down = _hyperfleet(home, "down")
    assert down.returncode == 0, down.stderr


def test_up_refuses_a_bad_cidr_before_starting_anything(tmp_path: Path) -> None:
    bad = _hyperfleet(tmp_path, "up", "--trusted-proxies", "10.0.0.0/8,10.0.0.1/8")
    assert bad.returncode == 2
    assert "--trusted-proxies: '10.0.0.1/8' is not a CIDR" in bad.stderr
    assert not (tmp_path / "stack.json").exists()
