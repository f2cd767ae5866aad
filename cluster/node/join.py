"""The node agent's side of joining a cluster: the head runs the join service, a worker redeems.

A worker's env carries a one-time ticket (``cluster.join.tickets``), never the Ray auth token.
The worker trades it at the head's join service (``cluster.join.service``) for the token,
retrying until a deadline: the head may still be starting, and a respawned workload is refused
(409) until the GCS has declared its previous node dead. The request leaves from the node's own
address, so the head sees (and rate limits) each node by the address it will have in Ray, even
when several nodes share one machine.

The head's agent binds the join service's socket itself and hands it to a child process, so the
port is known (and exported to ``ray start --head``) before the service runs, and a restarted
service keeps it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import yaml

from hyperfleet.errors import HyperfleetError
from hyperfleet.processes import spawn, stop

from .join_key import JoinKeyError, NodeKey
from .metrics import JoinAttempt
from .settings import NodeSettings, NodeSettingsError

logger = logging.getLogger("hyperfleet.node")

JOIN_PATH = "/v1/join"
JOIN_DB_FILE = "join.db"
JOIN_REQUEST_TIMEOUT_S = 10.0
JOIN_RETRY_MIN_S = 1.0
JOIN_RETRY_MAX_S = 10.0
MAX_RESPONSE_BYTES = 64 * 1024
JOIN_SERVICE_MAX_RESTARTS = 5  # within JOIN_SERVICE_RESTART_WINDOW_S
JOIN_SERVICE_RESTART_WINDOW_S = 600.0
JOIN_SERVICE_STOP_GRACE_S = 10.0
LISTEN_BACKLOG = 64
# The provider's default image (autoscaling.provider_config.DEFAULT_IMAGE, which this package may
# not import); a unit test keeps the two equal.
DEFAULT_NODE_IMAGE = "ghcr.io/hyperfleet/node:latest"
# Never handed to a child: the spent ticket, and a token that would override RAY_AUTH_TOKEN_PATH.
# The ticket and a token never reach Ray's processes; a one-machine stack's loopback switch
# (cluster.cli.servers.LOOPBACK_RAY_ENV) would make a worker's `ray start` refuse to run.
SCRUBBED_ENV = ("HYPERFLEET_JOIN_TICKET", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


class NodeAgentError(HyperfleetError):
    """The node could not be started or kept running; ``exit_code`` is the agent's."""

    exit_code = 1


class JoinFailed(NodeAgentError):
    """The head refused the ticket, or did not answer before the join deadline."""

    exit_code = 3


class Stopping(Protocol):
    """The agent's stop request, as a redemption waiting to retry sees it."""

    def is_set(self) -> bool: ...

    def wait(self, timeout_s: float) -> bool: ...


@dataclass(frozen=True)
class HeadServices:
    """What the head's node agent exports to ``ray start --head`` for the autoscaler's provider."""

    join_db: Path
    join_url: str


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _post_join(
    join_url: str, body: dict[str, object], source_ip: str
) -> tuple[int, str | None, bytes]:
    parts = urlsplit(join_url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(
        parts.hostname or "",
        parts.port,
        timeout=JOIN_REQUEST_TIMEOUT_S,
        source_address=(source_ip, 0),
    )
    try:
        headers = {"Content-Type": "application/json"}
        connection.request("POST", parts.path + JOIN_PATH, json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, response.getheader("Retry-After"), response.read(MAX_RESPONSE_BYTES)
    finally:
        connection.close()


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def redeem_ticket(
    join_url: str,
    ticket: str,
    instance_id: str,
    key: NodeKey,
    source_ip: str,
    timeout_s: float,
    stopping: Stopping,
    count: Callable[[JoinAttempt], None] | None = None,
) -> str:
    """Trades ``ticket`` for the token at the head, retrying until ``timeout_s``.

    Each request is signed with ``key``, whose fingerprint the agent printed to its console;
    the head answers with the token sealed to ``key`` for ``instance_id``.
    Connection failures, 409 (the instance's previous node is still alive, or the head cannot
    see the key in this workload's console yet), 429 and 5xx are retried with backoff, or after
    the server's Retry-After; any other refusal is final. ``count`` is told the outcome of each
    request sent: joined, retry, or failed (the last one when the join fails).

    Raises:
        JoinFailed: refused, out of time, asked to stop, or an answer not sealed to ``key`` for
            ``instance_id``.
    """
    counted = count or (lambda outcome: None)
    deadline = time.monotonic() + timeout_s
    delay_s = JOIN_RETRY_MIN_S
    last = "no answer"
    while not stopping.is_set():
        retry_after_s: float | None = None
        try:
            request = key.signed_request(ticket, instance_id, time.time())
            status, retry_after, body = _post_join(join_url, request, source_ip)
        except OSError as e:  # refused, unreachable, timed out: the head may be starting
            last = str(e) or type(e).__name__
        else:
            if status == 200:
                try:
                    token = _open_answer(body, instance_id, key)
                except JoinFailed:
                    counted(JoinAttempt.FAILED)
                    raise
                counted(JoinAttempt.JOINED)
                return token
            last = f"HTTP {status}: {_message(body)}"
            if status not in (409, 429) and status < 500:
                counted(JoinAttempt.FAILED)
                raise JoinFailed(f"the head refused the join ticket ({last})")
            with contextlib.suppress(TypeError, ValueError):
                retry_after_s = float(retry_after or "")
        wait_s = min(JOIN_RETRY_MAX_S, retry_after_s or delay_s)
        if time.monotonic() + wait_s > deadline:
            counted(JoinAttempt.FAILED)
            raise JoinFailed(f"could not join at {join_url} in {timeout_s:.0f} s (last: {last})")
        counted(JoinAttempt.RETRY)
        logger.info("not joined yet (%s); retrying in %.0f s", last, wait_s)
        stopping.wait(wait_s)
        delay_s = min(JOIN_RETRY_MAX_S, delay_s * 2)
    raise JoinFailed("asked to stop before joining")


def _open_answer(body: bytes, instance_id: str, key: NodeKey) -> str:
    try:
        answer = json.loads(body)
        answered_id, sealed = str(answer["instance_id"]), str(answer["sealed_token"])
    except (ValueError, KeyError, TypeError) as e:
        # Never the body: a 200 answer is the token reply.
        raise JoinFailed(
            f"the join service's 200 answer is no token reply ({type(e).__name__})"
        ) from e
    if answered_id != instance_id:
        raise JoinFailed(f"the ticket is for instance {answered_id}, not this one")
    try:
        return key.open(sealed, instance_id).decode()
    except (JoinKeyError, UnicodeDecodeError) as e:
        raise JoinFailed(f"the head's token reply does not open with this node's key ({e})") from e


def console_source_args(settings: NodeSettings) -> list[str]:
    """The join service's flags for where it reads nodes' consoles: the consoles directory if
    set, else the Hypercore and node images of the head's autoscaling config, else none (the
    service then refuses every join: it cannot tell a node from someone who read its env)."""
    if settings.join_consoles_dir is not None:
        return [f"--consoles-dir={settings.join_consoles_dir}"]
    if settings.autoscaling_config is None:
        return []
    try:
        config = yaml.safe_load(settings.autoscaling_config.read_text())
        provider = config["provider"]
        address = str(provider["hypercore_address"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        logger.warning("no Hypercore in the autoscaling config (%s): nodes cannot join", e)
        return []
    images = {str(provider.get("default_image") or DEFAULT_NODE_IMAGE)}
    for node_type in (config.get("available_node_types") or {}).values():
        if image := ((node_type or {}).get("node_config") or {}).get("image"):
            images.add(str(image))
    transport = str(provider.get("transport") or "grpc")
    return [
        f"--hypercore-address={address}",
        f"--hypercore-transport={transport}",
        *(f"--image={image}" for image in sorted(images)),
    ]


class RestartBudget:
    """At most ``max_restarts`` restarts in any ``window_s``: a rare crash never adds up to a
    give-up over a long life, a crash loop still does."""

    def __init__(
        self,
        max_restarts: int = JOIN_SERVICE_MAX_RESTARTS,
        window_s: float = JOIN_SERVICE_RESTART_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_restarts
        self._window_s = window_s
        self._clock = clock
        self._at: deque[float] = deque()

    def take(self) -> bool:
        """Whether one more restart is allowed now; counts it if so."""
        now = self._clock()
        while self._at and self._at[0] <= now - self._window_s:
            self._at.popleft()
        if len(self._at) >= self._max:
            return False
        self._at.append(now)
        return True


class JoinService:
    """The head's join service process, restarted on the same listening socket if it dies."""

    def __init__(self, settings: NodeSettings, node_ip: str, token_path: Path) -> None:
        family = socket.AF_INET6 if ipaddress.ip_address(node_ip).version == 6 else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((node_ip, settings.join_port))
        except OSError as e:
            self._listener.close()
            raise NodeSettingsError(
                f"HYPERFLEET_JOIN_PORT: cannot listen on {node_ip}:{settings.join_port} ({e})"
            ) from e
        self._listener.listen(LISTEN_BACKLOG)
        port = self._listener.getsockname()[1]
        self.endpoints = HeadServices(
            join_db=settings.home / JOIN_DB_FILE, join_url=f"http://{host_port(node_ip, port)}"
        )
        self._argv = [
            sys.executable, "-m", "cluster.join.service",
            f"--fd={self._listener.fileno()}",
            f"--db={self.endpoints.join_db}",
            f"--token-file={token_path}",
            f"--gcs-address={host_port(node_ip, settings.ray_port)}",
            *console_source_args(settings),
        ]  # fmt: skip
        # The service asks the GCS whether an instance is alive: it needs the token too.
        self._env = {
            **{k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
        }
        self._restarts = RestartBudget()
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return spawn(self._argv, env=self._env, pass_fds=(self._listener.fileno(),))

    def check(self) -> None:
        """Restarts the service if it died; raises ``NodeAgentError`` once it died too often."""
        code = self.process.poll()
        if code is None:
            return
        if not self._restarts.take():
            raise NodeAgentError(f"the join service keeps dying (last exit status {code})")
        logger.warning("the join service exited with %s; restarting it", code)
        self.process = self._start()

    def stop(self) -> None:
        stop(self.process, JOIN_SERVICE_STOP_GRACE_S)
        self._listener.close()
