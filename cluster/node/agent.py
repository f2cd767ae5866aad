"""``hyperfleet node``: the entrypoint of Hyperfleet's VM image, which runs one Ray node.

Hypercore starts the image with env only (no command override), so everything comes from
``NodeSettings``. The agent then:
1. reads the GPUs with NVML (``gpus.discover``); none is a CPU node, not an error;
2. gets the Ray auth token: the head generates it (mode 0600 under ``HYPERFLEET_HOME``) and starts
   the join service; a worker redeems its one-time ticket at the head's join service, retrying
   until a deadline because the head may still be starting;
3. runs ``ray start --block`` with the argv and env of ``ray_start_command`` (a pure function):
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

Several nodes may share one machine (the local Hypercore stand-in gives each its own 127.x
address), so every Ray port but the head's GCS port is left to Ray to pick or bound to the node's
own address (the Ray Client server's 10001), and the object store is sized from
``HYPERFLEET_MEMORY_MB`` rather than from the whole machine's memory. The exception is the
raylet's port when the agent keeps spare workers (``warm_workers.py``): the agent picks a free
one, which another process could take in the second before the raylet binds it (then Ray fails
to start, as for any other start failure).

Exit codes: 0 stopped on request, 1 Ray failed or died, 2 invalid settings, 3 could not join.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from hyperfleet.processes import descendants, reap_leftovers

from . import gpus
from .gcs import GcsUnavailable, instance_nodes
from .join import (
    SCRUBBED_ENV,
    HeadServices,
    JoinFailed,
    JoinService,
    NodeAgentError,
    host_port,
    redeem_ticket,
    spawn,
)
from .settings import NodeRole, NodeSettings, NodeSettingsError, is_label_value
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
OBJECT_STORE_FRACTION = 0.3  # Ray's own default share of memory
OBJECT_STORE_MIN_MB = 128  # Ray refuses less than 75 MiB
MIB = 1024 * 1024
# Autoscaler v2 waits this long (Ray's default: an hour) for Ray to run on an instance it allocated
# before it terminates the instance and launches another; until then the instance counts as
# coming up, so the demand it was for waits too. Starting a node takes seconds to a few minutes:
# at most the join deadline (HYPERFLEET_JOIN_TIMEOUT_S, 180 s by default) and three `ray start`s
# (each up to Ray's 30 s wait to register) 5 s and 10 s apart. The operator's own value wins.
AUTOSCALER_ALLOCATE_TIMEOUT_S = 600
# Ray's autoscaler sleeps 5 s between updates, and a pending replica waits for up to two of them
# (one to Spawn, one to see the node); at 1 s, the provider's List cache (1 s) bounds the cost to
# one List a second. The operator's own AUTOSCALER_UPDATE_INTERVAL_S wins.
AUTOSCALER_UPDATE_INTERVAL_S = 1
# Where a head without HYPERFLEET_NODE_IP looks for its outward address (no packet is sent).
ROUTE_PROBE = ("8.8.8.8", 53)
NODE_TYPE_LABEL = "hyperfleet/node-type"
INSTANCE_ID_LABEL = "hyperfleet/instance-id"
CLUSTER_LABEL = "hyperfleet/cluster"


@dataclass(frozen=True)
class RayStart:
    """How to run ``ray start``: its argv and its whole environment."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(repr=False)


def ray_start_command(
    settings: NodeSettings,
    gpu: gpus.RayGpuOptions,
    node_ip: str,
    token_path: Path,
    base_env: Mapping[str, str],
    ray_executable: str,
    head: HeadServices | None = None,
    node_manager_port: int = 0,
) -> RayStart:
    """The ``ray start --block`` command for this node; pure, so it is tested on its own.

    Args:
        settings: the node's settings.
        gpu: what ``gpus.ray_gpu_options`` made of the node's GPUs.
        node_ip: the address Ray advertises for this node.
        token_path: the Ray auth token file (0600).
        base_env: the environment to extend (the agent's own, normally).
        ray_executable: the ``ray`` CLI.
        head: the head's join service, exported for the autoscaler's provider (head only).
        node_manager_port: the raylet's port (0: Ray picks one); the agent names one so that
            it can reach its raylet to keep spare workers.
    """
    env = {k: v for k, v in base_env.items() if k not in SCRUBBED_ENV}
    env.update(gpu.env)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_CLOUD_INSTANCE_ID": settings.instance_id,
            "RAY_NODE_TYPE_NAME": settings.node_type,
        }
    )
    argv = [ray_executable, "start", "--block", "--disable-usage-stats"]
    argv.append(f"--node-ip-address={node_ip}")
    if settings.role is NodeRole.HEAD:
        assert head is not None, "the head needs its join service"
        gcs_address = host_port(node_ip, settings.ray_port)
        argv += ["--head", f"--port={settings.ray_port}"]
        env.update(
            {
                "HYPERFLEET_JOIN_DB": str(head.join_db),
                "HYPERFLEET_JOIN_URL": head.join_url,
                "HYPERFLEET_HEAD_ADDRESS": gcs_address,
            }
        )
        if settings.autoscaling_config is not None:
            argv.append(f"--autoscaling-config={settings.autoscaling_config}")
            env["RAY_enable_autoscaler_v2"] = "1"
            env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", str(AUTOSCALER_UPDATE_INTERVAL_S))
            env.setdefault(
                "RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S",
                str(AUTOSCALER_ALLOCATE_TIMEOUT_S),
            )
    else:
        assert settings.head_address is not None
        argv.append(f"--address={settings.head_address}")
    # 0: Ray picks a free port. Its default, 52365, is bound on 127.0.0.1 too by every node whose
    # address is not 127.0.0.1 (ray/dashboard/http_server_agent.py): nodes sharing a host collide.
    argv.append("--dashboard-agent-listen-port=0")
    if node_manager_port:
        argv.append(f"--node-manager-port={node_manager_port}")
    # This machine's own temp dir, as Ray picks the head's. Without it a worker uses the head's
    # path, and nodes sharing one host share a session directory: Ray names each node's sockets
    # by the first index free there and creates them only later, so two nodes starting at once
    # pick the same names and the second raylet dies on bind before it registers.
    argv.append(f"--temp-dir={ray_temp_dir(base_env)}")
    if settings.num_cpus is not None:
        argv.append(f"--num-cpus={settings.num_cpus}")
    argv.append(f"--num-gpus={gpu.num_gpus}")
    if settings.memory_mb is not None:
        object_store_mb = max(OBJECT_STORE_MIN_MB, int(settings.memory_mb * OBJECT_STORE_FRACTION))
        argv.append(f"--memory={(settings.memory_mb - object_store_mb) * MIB}")
        argv.append(f"--object-store-memory={object_store_mb * MIB}")
    # Discovered hardware wins over the env for MIG resources; identity labels win over both.
    resources = {**settings.resources, **gpu.resources}
    argv.append(f"--resources={json.dumps(resources, sort_keys=True)}")
    labels = {**gpu.labels, **settings.labels, NODE_TYPE_LABEL: settings.node_type}
    # Ray's node table carries the instance id either way; labels only when their syntax allows.
    for key, value in (
        (INSTANCE_ID_LABEL, settings.instance_id),
        (CLUSTER_LABEL, settings.cluster),
    ):
        if value and is_label_value(value):
            labels[key] = value
    argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
    return RayStart(tuple(argv), env)


def ray_temp_dir(env: Mapping[str, str]) -> str:
    """Ray's default temp dir for a head on this (Linux) machine, as
    ``ray._common.utils.get_default_ray_temp_dir`` finds it: ``RAY_TMPDIR``, else ``TMPDIR``,
    else /tmp, then ``ray``."""
    for name in ("RAY_TMPDIR", "TMPDIR"):
        if name in env:
            return os.path.join(env[name], "ray")
    return "/tmp/ray"  # noqa: S108 (Ray's default)


def detect_node_ip(toward: tuple[str, int]) -> str:
    """The local address of a UDP socket "connected" toward ``toward``: no packet is sent."""
    family = socket.AF_INET6 if ":" in toward[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(toward)
        return str(probe.getsockname()[0])


def node_ip_of(settings: NodeSettings) -> str:
    if settings.node_ip is not None:
        return settings.node_ip
    target = ROUTE_PROBE
    if settings.head_address is not None:
        host, _, port = settings.head_address.rpartition(":")
        target = (host.strip("[]"), int(port))
    try:
        return detect_node_ip(target)
    except OSError as e:
        raise NodeSettingsError(
            f"HYPERFLEET_NODE_IP: unset, and no route toward {target[0]} to find it ({e})"
        ) from e


def free_port_on(ip: str) -> int:
    """A TCP port free on every address of ``ip``'s family now, for a Ray port: Ray may bind
    it on all addresses, and other nodes on this machine hold ports on their own addresses."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        port: int = probe.getsockname()[1]
        return port


def raylet_port_for(settings: NodeSettings, node_ip: str) -> int:
    """The port to give the raylet: one the spare-worker keeper can reach it on, or 0 (Ray picks)
    when the node keeps no spares or no port could be found (then it keeps none)."""
    if not settings.warm_workers:
        return 0
    try:
        return free_port_on(node_ip)
    except OSError as e:
        logger.warning("spare workers: no free port for the raylet (%s); keeping none", e)
        return 0


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


def write_secret(path: Path, value: str) -> None:
    """Writes ``value`` to ``path`` with mode 0600 from the start (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)


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
        write_secret(path, secrets.token_hex(32))
        logger.info("generated the cluster's Ray auth token in %s", path)
    path.chmod(0o600)
    return path


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """SIGTERM to ``process`` alone; SIGKILL to its group after ``timeout_s``. Returns its exit
    status, or None if it had to be killed. Descendants that outlive it are reaped."""
    if process.poll() is not None:
        return process.returncode
    tree = descendants(process.pid)
    os.kill(process.pid, signal.SIGTERM)
    try:
        code: int | None = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.error("pid %d did not stop within %.0f s; killing it", process.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # stuck in the kernel (D state): reap what we can
            logger.error("pid %d survived SIGKILL for %.0f s", process.pid, STOP_GRACE_S)
        code = None
    reap_leftovers(tree)
    return code


def reap_orphans(own_pids: Collection[int]) -> list[int]:
    """Waits for exited children that the agent did not start itself; returns their pids.

    A container's entrypoint is PID 1, and orphans (a Ray worker that outlived its raylet) are
    reparented to it: without a wait they stay zombies. The agent's own children are left to
    ``Popen``, which needs their exit status.
    """
    reaped = []
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own_pids:
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # gone meanwhile
            continue
        if ppid == me and state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)
                reaped.append(int(entry.name))
    return reaped


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

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        self._stopping.set()

    def run(self) -> int:
        settings = self.settings
        inventory = gpus.discover()
        if not inventory.gpus:
            logger.info("no GPU (%s): a CPU node", inventory.error or "NVML lists none")
        gpu = gpus.ray_gpu_options(inventory)
        node_ip = node_ip_of(settings)
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        join: JoinService | None = None
        if settings.role is NodeRole.HEAD:
            settings = with_autoscaling_config_file(settings)
            token_path = ensure_head_token(settings.home)
            join = JoinService(settings, node_ip, token_path)
            logger.info("join service on %s", join.endpoints.join_url)
        else:
            assert settings.join_url is not None and settings.join_ticket is not None
            try:
                token, instance_id = redeem_ticket(
                    settings.join_url,
                    settings.join_ticket.get_secret_value(),
                    node_ip,
                    settings.join_timeout_s,
                    self._stopping,
                )
            except JoinFailed:
                if self._stopping.is_set():
                    return EXIT_STOPPED
                raise
            if instance_id != settings.instance_id:
                raise JoinFailed(f"the ticket is for instance {instance_id}, not this one")
            token_path = settings.home / TOKEN_FILE
            write_secret(token_path, token)
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
            ray = spawn(command.argv, command.env)
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
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ray.pid, signal.SIGKILL)
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
                    _stop_process(ray, self.settings.drain_timeout_s + STOP_GRACE_S)
                    raise
        self._stop_keeper()
        logger.info(
            "asked to stop: draining the node (up to %.0f s)", self.settings.drain_timeout_s
        )
        # Ray's SIGTERM handler drains the node, stops its processes and exits 1 by design
        # (ray/_private/node.py); that is a clean stop here.
        code = _stop_process(ray, self.settings.drain_timeout_s + STOP_GRACE_S)
        logger.info("ray start stopped (exit %s)", code)
        return EXIT_STOPPED if code is not None else EXIT_RAY_FAILED

    def _park(self, own_pids: Collection[int]) -> int:
        """Waits for SIGTERM/SIGINT after Ray exited on a worker; see ``after_ray_exit``."""
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
        return EXIT_STOPPED


def main(env: Mapping[str, str] | None = None) -> int:
    """``hyperfleet node``: runs this machine's Ray node from the env; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s hyperfleet-node %(levelname)s %(message)s"
    )
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
