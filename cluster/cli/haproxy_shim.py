"""What runs as Serve's HAProxy binary on a Hyperfleet node: it adds two lines to the
configuration Ray wrote, then becomes the bundled HAProxy (``exec``, same pid).

Ray's template (``ray/serve/_private/haproxy_templates.py``, 2.60) forwards a request with the
client's own headers and no ``X-Forwarded-For``, so the ingress sees every client as HAProxy's
127.0.0.1. The lines make HAProxy overwrite ``X-Hyperfleet-Peer`` with the TCP peer it saw
(``%[src]``) and ``X-Hyperfleet-Proxy-Token`` with a secret (``serve_app/client_address.py``
says why a secret). The secret reaches HAProxy in its environment, expanded by HAProxy when it
reads the file, so the configuration (in ``/tmp``) never holds it.

How Ray runs the binary (``haproxy.py``): ``RAY_SERVE_HAPROXY_BINARY_PATH`` must be an
executable file; each start and reload is ``<binary> -db -f <config> [-dR] [-sf pids] [-x
socket]`` right after Ray rewrote ``<config>`` under ``flock(<config>.lock)``. Ray then waits for
the admin socket to report that very pid, and finds its old workers by the config path in their
``/proc/<pid>/cmdline``: so the shim edits the file in place (under the same lock) and keeps the
argv as Ray gave it. A template without ``frontend http_frontend`` and its ``bind`` line (a Ray
upgrade) stops the start with a message: running without the lines would put every client into
one shared window.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

TOKEN_ENV = "HYPERFLEET_PROXY_TOKEN"  # noqa: S105 (the name of a variable)
MARKER = "# hyperfleet: the client's address, vouched for by a token"
_LINES = (
    f"    {MARKER} (docs/security.md)",
    "    http-request set-header X-Hyperfleet-Peer %[src]",
    f'    http-request set-header X-Hyperfleet-Proxy-Token "${{{TOKEN_ENV}}}"',
)
FRONTEND = "frontend http_frontend"


class ShimError(Exception):
    """The configuration is not one the shim knows how to amend."""


# Ray's template binds its stats page and HAProxy's Prometheus exporter on every interface
# (``bind *:port``, ``bind :port``), unauthenticated; the local stack keeps them on loopback.
_ANY_INTERFACE = re.compile(r"^(\s*bind )\*?:(\d+)\s*$")
_LOOPBACK_SECTIONS = ("frontend prometheus", "listen stats")


def loopback_admin(config: str) -> str:
    """``config`` with the stats and exporter sections bound to 127.0.0.1."""
    lines = config.split("\n")
    section = ""
    for i, line in enumerate(lines):
        if line and not line[0].isspace():
            section = line.strip()
        elif section in _LOOPBACK_SECTIONS:
            lines[i] = _ANY_INTERFACE.sub(r"\g<1>127.0.0.1:\2", line)
    return "\n".join(lines)


def amend(config: str) -> str:
    """``config`` with the peer and token lines first in the HTTP frontend (once), and the
    stats page and exporter on loopback."""
    config = loopback_admin(config)
    if MARKER in config:
        return config
    lines = config.split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == FRONTEND)
    except StopIteration:
        raise ShimError(f"no '{FRONTEND}' section in the HAProxy configuration") from None
    for i in range(start + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped.startswith(("frontend ", "backend ", "listen ", "defaults", "global")):
            break
        if stripped.startswith("bind "):
            return "\n".join([*lines[: i + 1], *_LINES, *lines[i + 1 :]])
    raise ShimError(f"no 'bind' line in '{FRONTEND}' of the HAProxy configuration")


def config_path(argv: Sequence[str]) -> Path:
    """The configuration file in HAProxy's argv (``-f <path>``)."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-f":
            return Path(value)
    raise ShimError("no '-f <config>' in HAProxy's arguments")


def amend_file(path: Path) -> None:
    """Amends the file in place, under Ray's lock, keeping its inode and mode."""
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = path.read_text()
            amended = amend(text)
            if amended != text:
                path.write_text(amended)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def run(binary: str, token_file: Path, argv: Sequence[str]) -> None:
    """Amends the configuration ``argv`` names, then execs ``binary`` with ``argv`` and the
    token from ``token_file`` in its environment. Returns only by raising."""
    token = token_file.read_text().strip()
    if not token:
        raise ShimError(f"{token_file} is empty")
    if "-v" not in argv and "-vv" not in argv:
        amend_file(config_path(argv))
    # Becomes HAProxy, with Ray's argv: Ray waits for this pid on HAProxy's admin socket.
    os.execve(binary, [binary, *argv], {**os.environ, TOKEN_ENV: token})  # noqa: S606


def main(binary: str, token_file: str) -> None:
    """The entry point the wrapper ``stack.haproxy_wrapper`` writes calls."""
    try:
        run(binary, Path(token_file), sys.argv[1:])
    except (ShimError, OSError) as e:
        print(f"hyperfleet haproxy shim: {e}", file=sys.stderr)
        sys.exit(1)


def wrapper_script(python: str, binary: str, token_file: Path) -> str:
    """The executable file ``RAY_SERVE_HAPROXY_BINARY_PATH`` names: this module's ``main``."""
    return (
        f"#!{python} -I\n"
        "from cluster.cli.haproxy_shim import main\n\n"
        f"main({binary!r}, {str(token_file)!r})\n"
    )
