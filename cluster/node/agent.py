"""``hyperfleet node``: the entrypoint of Hyperfleet's VM image, which runs one Ray node.

Hypercore starts the image with env only (no command override), so everything comes from
``NodeSettings``. The agent then:
1. reads the GPUs with NVML (``gpus.discover``); none is a CPU node, not an error;
2. gets the Ray auth token: the head generates it (mode 0600 under ``HYPERFLEET_HOME``) and starts
   the join service; a worker redeems its one-time ticket at the head's join service, retrying
   until a deadline because the head may still be starting;
3. runs ``ray start --block`` with the argv and env of ``ray_start.ray_start_command`` (a pure
   function):
   token auth, ``RAY_CLOUD_INSTANCE_ID`` and ``RAY_NODE_TYPE_NAME`` (autoscaler v2 matches nodes on
   them), GPUs, resources, labels; the ticket is not passed on;
4. supervises: SIGTERM or SIGINT is forwarded as SIGTERM to the ``ray start`` process only (its
   group would lose the GCS before the node drains: Ray then waits out the whole drain timeout),
   Ray drains the node for up to ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``, and the agent exits 0.
   If ``ray start`` exits on its own on the head, the agent exits non-zero so Hypercore restarts
   the workload. On a worker it parks instead (``after_ray_exit``): the likely cause is the
   autoscaler draining an idle node before its provider terminates the workload, and a
   respawned agent would rejoin in between. It waits for SIGTERM/SIGINT (exit 0), at most
   ``PARK_AFTER_RAY_EXIT_S`` (then exit 1). Unless the GCS shows that the node never registered:
   then nothing drained it, the autoscaler is still waiting for Ray on the instance, and the
   agent starts Ray again, ``RAY_START_ATTEMPTS`` times in all, then parks; the head's autoscaler
   terminates an instance that has run no Ray for ``AUTOSCALER_ALLOCATE_TIMEOUT_S``.

The agent counts its join requests and says what it is doing (``metrics``), served on the node's
address at ``HYPERFLEET_METRICS_PORT`` for as long as it runs.

Stopping ``ray start`` and its tree, and collecting orphans as a container's PID 1 must, is
``hyperfleet.processes``'s.

Exit codes: 0 stopped on request, 1 Ray failed or died, 2 invalid settings, 3 could not join.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import FrameType

from hyperfleet import logs
from hyperfleet.private import write_private
from hyperfleet.processes import reap_orphans, spawn, stop

from . import gpus
from .gcs import GcsUnavailable, instance_nodes
from .join import JoinFailed, JoinService, NodeAgentError, host_port, redeem_ticket
from .join_key import NodeKey, console_line
from .metrics import NodeMetrics, NodeState
from .ray_start import node_ip_of, ray_start_command, raylet_port_for
from .settings import NodeRole, NodeSettings, NodeSettingsError
from .warm_workers import RayletClient, WarmWorkerKeeper

logger = logging.getLogger("hyperfleet.node")

EXIT_STOPPED = 0
EXIT_RAY_FAILED = NodeAgentError.exit_code  # 1
EXIT_BAD_SETTINGS = 2
EXIT_JOIN_FAILED = JoinFailed.exit_code  # 3

TOKEN_FILE = "ray_auth_token"  # noqa: S105 (a file name)
AUTOSCALING_CONFIG_FILE = "autoscaling_config.json"
# After Ray's drain budget: time for `ray start` to stop its processes before SIGKILL.
STOP_GRACE_S = 20.0
POLL_S = 0.2
# A worker whose `ray start` exited waits this long for the provider to terminate it.
PARK_AFTER_RAY_EXIT_S = 3600.0
# A worker whose Ray exits before its node registered starts it again, this many times in all,
# waiting RAY_START_BACKOFF_S times the attempt's number in between.
RAY_START_ATTEMPTS = 3
RAY_START_BACKOFF_S = 5.0
# The GCS's answer to "did this node register?", asked once Ray has exited.
GCS_PROBE_TIMEOUT_S = 10.0


def ray_nodes_at(
    gcs_address: str, token_path: Path, node_ip: str, instance_id: str
) -> frozenset[bytes] | None:
    """The ids of the nodes, alive or dead, that the GCS lists at ``node_ip`` for
    ``instance_id``; None if it did not answer. A ``ray start`` whose node is not among them
    after it exited never registered (the GCS keeps its dead nodes)."""
    try:
        nodes = instance_nodes(
            gcs_address, token_path, instance_id, node_ip=node_ip, timeout_s=GCS_PROBE_TIMEOUT_S
        )
    except GcsUnavailable as e:
        logger.warning("cannot tell which nodes this instance has had: %s", e.message)
        return None
    return frozenset(node.node_id for node in nodes)


def with_autoscaling_config_file(settings: NodeSettings) -> NodeSettings:
    """The settings with an inline ``HYPERFLEET_AUTOSCALING_CONFIG_JSON`` written to a file
    under ``HYPERFLEET_HOME``: ``ray start`` reads the config from a file (YAML, a superset of
    JSON)."""
    if settings.autoscaling_config_json is None:
        return settings
    path = settings.home / AUTOSCALING_CONFIG_FILE
    path.write_text(json.dumps(settings.autoscaling_config_json, indent=2))
    return settings.model_copy(update={"autoscaling_config": path})


def ensure_head_token(home: Path) -> Path:
    """The head's Ray auth token file, generated on first start and kept across restarts."""
    path = home / TOKEN_FILE
    if not path.exists() or not path.read_text().strip():
        write_private(path, secrets.token_hex(32) + "\n")
        logger.info("generated the cluster's Ray auth token in %s", path)
    path.chmod(0o600)
    return path


def _registered_since(
    nodes_at: Callable[[], frozenset[bytes] | None], before: frozenset[bytes]
) -> bool | None:
    """Whether ``nodes_at`` lists a node that ``before`` did not; None if it cannot tell."""
    after = nodes_at()
    return None if after is None else bool(after - before)


class RayNeverRegistered(NodeAgentError):
    """A worker's ``ray start`` exited before its node registered with the GCS."""


class AfterRayExit(enum.Enum):
    """What the agent does once ``ray start --block`` exits on its own."""

    EXIT = "exit"  # exit non-zero: Hypercore restarts the workload
    PARK = "park"  # wait for the provider's terminate (SIGTERM), then exit 0


def after_ray_exit(role: NodeRole) -> AfterRayExit:
    """The head exits (the cluster needs it back); a worker parks.

    A worker's Ray exits on its own mostly because the autoscaler drained it as idle, and the
    provider's terminate follows. Exiting would let Hypercore respawn the workload, which would
    rejoin the cluster just before being terminated.
    """
    return AfterRayExit.EXIT if role is NodeRole.HEAD else AfterRayExit.PARK


class StopFlag:
    """Set from a signal handler, polled by the main thread.

    Not a ``threading.Event``: its ``set`` takes a lock that the interrupted main thread may hold.
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout_s: float) -> bool:
        """Sleeps up to ``timeout_s``, returning early (True) once the flag is set."""
        deadline = time.monotonic() + timeout_s
        while not self._set and (left_s := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL_S, left_s))
        return self._set


class NodeAgent:
    """Runs one Ray node until asked to stop or until Ray dies."""

    def __init__(self, settings: NodeSettings, env: Mapping[str, str]) -> None:
        self.settings = settings
        self._env = env
        self._stopping = StopFlag()
        self._keeper: WarmWorkerKeeper | None = None
        self.metrics = NodeMetrics()

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        self._stopping.set()

    def run(self) -> int:
        node_ip = node_ip_of(self.settings)
        server = self.metrics.serve(node_ip, self.settings.metrics_port)
        try:
            return self._run(node_ip)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()

    def _run(self, node_ip: str) -> int:
        settings = self.settings
        inventory = gpus.discover()
        if not inventory.gpus:
            logger.info("no GPU (%s): a CPU node", inventory.error or "NVML lists none")
        gpu = gpus.ray_gpu_options(inventory)
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        join: JoinService | None = None
        if settings.role is NodeRole.HEAD:
            settings = with_autoscaling_config_file(settings)
            token_path = ensure_head_token(settings.home)
            join = JoinService(settings, node_ip, token_path)
            logger.info("join service on %s", join.endpoints.join_url)
        else:
            assert settings.join_url is not None and settings.join_ticket is not None
            # The key lives in this process only; its fingerprint goes to the console, where
            # the head reads it through Hypercore's Logs (docs/join.md).
            key = NodeKey.generate()
            print(console_line(key.fingerprint), file=sys.stderr, flush=True)
            self.metrics.set_state(NodeState.JOINING)
            try:
                token = redeem_ticket(
                    settings.join_url,
                    settings.join_ticket.get_secret_value(),
                    settings.instance_id,
                    key,
                    node_ip,
                    settings.join_timeout_s,
                    self._stopping,
                    self.metrics.count_join,
                )
            except JoinFailed:
                if self._stopping.is_set():
                    return EXIT_STOPPED
                raise
            token_path = settings.home / TOKEN_FILE
            write_private(token_path, token + "\n")
            logger.info("joined: the head gave this node the cluster's token")
        try:
            for attempt in range(1, RAY_START_ATTEMPTS + 1):
                if self._stopping.is_set():
                    return EXIT_STOPPED
                try:
                    return self._run_ray(settings, gpu, node_ip, token_path, join)
                except RayNeverRegistered:
                    if attempt == RAY_START_ATTEMPTS:
                        # Not an exit: Hypercore's respawn could not rejoin (its ticket was
                        # redeemed, and no DEAD node proves a respawn). The autoscaler terminates
                        # an instance that runs no Ray (AUTOSCALER_ALLOCATE_TIMEOUT_S).
                        logger.error(
                            "Ray exited before this node registered, %d times: giving up", attempt
                        )
                        return self._park({join.process.pid} if join else set())
                    wait_s = RAY_START_BACKOFF_S * attempt
                    logger.warning(
                        "Ray exited before this node registered (attempt %d of %d): starting it"
                        " again in %.0f s",
                        attempt,
                        RAY_START_ATTEMPTS,
                        wait_s,
                    )
                    self.metrics.set_state(NodeState.STARTING)
                    if self._stopping.wait(wait_s):
                        return EXIT_STOPPED
            raise AssertionError("unreachable: the last attempt returns")
        finally:
            if join is not None:
                join.stop()

    def _run_ray(
        self,
        settings: NodeSettings,
        gpu: gpus.RayGpuOptions,
        node_ip: str,
        token_path: Path,
        join: JoinService | None,
    ) -> int:
        """One ``ray start --block``, supervised until it ends; raises ``RayNeverRegistered`` if
        a worker's Ray exited before its node registered."""
        registered: Callable[[], bool | None] | None = None
        if settings.role is NodeRole.WORKER and settings.head_address is not None:
            nodes_at = functools.partial(
                ray_nodes_at, settings.head_address, token_path, node_ip, settings.instance_id
            )
            before = nodes_at()
            if before is not None:
                registered = functools.partial(_registered_since, nodes_at, before)
        try:
            raylet_port = raylet_port_for(settings, node_ip)
            command = ray_start_command(
                settings,
                gpu,
                node_ip,
                token_path,
                self._env,
                str(Path(sys.executable).parent / "ray"),
                join.endpoints if join else None,
                raylet_port,
            )
            logger.info("starting: %s", " ".join(command.argv))
            ray = spawn(command.argv, env=command.env)
            self.metrics.set_state(NodeState.RUNNING)
            if raylet_port:
                raylet_address = host_port(node_ip, raylet_port)
                self._keeper = WarmWorkerKeeper(
                    lambda: RayletClient(raylet_address, token_path), settings.warm_workers
                )
                self._keeper.start()
            return self._supervise(ray, join, registered)
        finally:
            self._stop_keeper()

    def _stop_keeper(self) -> None:
        # Once Ray stops or drains, a spare is of no use, and the raylet's port may soon be
        # another process's: the token must not be sent there.
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None

    def _supervise(
        self,
        ray: subprocess.Popen[bytes],
        join: JoinService | None,
        registered: Callable[[], bool | None] | None = None,
    ) -> int:
        """Waits for a stop request or for Ray to exit; ``registered`` says, once a worker's Ray
        exited, whether its node had registered (None: unknown, taken as yes)."""
        is_init = os.getpid() == 1
        while not self._stopping.wait(POLL_S):
            if is_init:
                reap_orphans({ray.pid} | ({join.process.pid} if join else set()))
            code = ray.poll()
            if code is not None:
                self._stop_keeper()
                logger.error("ray start exited unexpectedly (status %s)", code)
                # Whatever it left behind in its process group (if it was killed) goes too.
                stop(ray, 0.0, leftover_grace_s=0.0)
                if after_ray_exit(self.settings.role) is AfterRayExit.PARK:
                    # Parking is for a node the autoscaler drained; one that never registered
                    # is unknown to it (its instance waits for Ray), so Ray is started again.
                    if registered is not None and registered() is False:
                        raise RayNeverRegistered(f"ray start exited with status {code}")
                    return self._park({join.process.pid} if join else set())
                return code if code > 0 else EXIT_RAY_FAILED
            if join is not None:
                try:
                    join.check()
                except NodeAgentError:
                    stop(ray, self.settings.drain_timeout_s + STOP_GRACE_S)
                    raise
        self._stop_keeper()
        self.metrics.set_state(NodeState.STOPPING)
        logger.info(
            "asked to stop: draining the node (up to %.0f s)", self.settings.drain_timeout_s
        )
        # Ray's SIGTERM handler drains the node, stops its processes and exits 1 by design
        # (ray/_private/node.py); that is a clean stop here.
        code = stop(ray, self.settings.drain_timeout_s + STOP_GRACE_S)
        logger.info("ray start stopped (exit %s)", code)
        return EXIT_STOPPED if code is not None else EXIT_RAY_FAILED

    def _park(self, own_pids: Collection[int]) -> int:
        """Waits for SIGTERM/SIGINT after Ray exited on a worker; see ``after_ray_exit``."""
        self.metrics.set_state(NodeState.PARKED)
        logger.warning(
            "the Ray node is gone (drained by the autoscaler?): waiting up to %.0f s for this"
            " workload to be terminated",
            PARK_AFTER_RAY_EXIT_S,
        )
        deadline = time.monotonic() + PARK_AFTER_RAY_EXIT_S
        is_init = os.getpid() == 1
        while not self._stopping.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                logger.error("not terminated within %.0f s; exiting", PARK_AFTER_RAY_EXIT_S)
                return EXIT_RAY_FAILED
            if is_init:
                reap_orphans(own_pids)
        logger.info("asked to stop while parked")
        self.metrics.set_state(NodeState.STOPPING)
        return EXIT_STOPPED


def main(env: Mapping[str, str] | None = None) -> int:
    """``hyperfleet node``: runs this machine's Ray node from the env; returns the exit code."""
    logs.configure("node-agent")
    env = os.environ if env is None else env
    try:
        settings = NodeSettings.from_env(env)
    except NodeSettingsError as e:
        print(f"hyperfleet node: {e.message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    agent = NodeAgent(settings, env)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    try:
        return agent.run()
    except NodeSettingsError as e:
        print(f"hyperfleet node: {e.message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except NodeAgentError as e:
        logger.error("%s", e.message)
        return e.exit_code
