"""The command runner ``ray up`` gets for a Hypercore node: it runs nothing remotely.

``ray up`` always sets the head up through a command runner: ``get_or_create_head_node`` builds a
``NodeUpdaterThread`` (Ray 2.60 ``autoscaler/_private/commands.py:894``), whose constructor asks
``provider.get_command_runner`` for one (``updater.py:109``; SSH by default). A Hypercore workload
has no SSH, no exec and no file copy: its only inputs are the Spawn request. Hyperfleet's image
runs the node agent as its entrypoint, and the agent starts Ray by itself from its env. So this
runner maps each step of Ray's updater (``ray/autoscaler/_private/updater.py``) to
what is true of such a node, and refuses anything it cannot do rather than pretending:

- ``uptime`` (``NodeUpdater.wait_ready``'s probe for a shell, ``updater.py:300``): succeeds once
  the workload runs, i.e. appears in Hypercore's List.
- ``mkdir -p`` before a file mount (``updater.py:248``), and the upload of
  ``~/ray_bootstrap_config.yaml`` (``commands.py:848``, ``_set_up_config_for_head_node``): nothing
  to do; the provider already put that config in the head's env (``bootstrap_config``). Any other
  file mount is refused: bake files into the image.
- A ``ray start`` command (``head_start_ray_commands``, ``updater.py:537``, prefixed with
  ``export RAY_enable_autoscaler_v2=1; ...`` by ``commands.py:889``): the node agent runs it itself,
  so the runner waits, up to ``head_start_timeout_s``, until the workload's log shows Ray's own
  ``Ray runtime started.`` line, and fails with the log's tail if the workload stops first.
- ``ray stop`` (sent by ``ray down`` before it terminates the nodes, ``commands.py:484``): nothing
  to do; Stop sends the node agent SIGTERM, which drains and stops Ray.
- Any other command is refused with an error saying why: keep the ``*_commands`` lists empty.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Protocol

from ray.autoscaler.command_runner import CommandRunnerInterface

from hyperfleet.errors import HyperfleetError

logger = logging.getLogger(__name__)

RAY_STARTED_MARKER = "Ray runtime started."
BOOTSTRAP_CONFIG_TARGET = "~/ray_bootstrap_config.yaml"
LOG_POLL_S = 1.0
LOG_TAIL_LINES = 20
# ``with_envs`` prefixes commands with ``export K=V; `` (ray/autoscaler/_private/util.py).
_EXPORTS = re.compile(r"^(\s*export\s+\S+=\S*;\s*)*")


class NoRemoteExecutionError(HyperfleetError):
    """``ray up``/``ray exec`` asked a Hypercore node to run a command or take a file."""

    status_code = 400
    error_type = "invalid_request"


class HeadStartError(HyperfleetError):
    """The node agent did not report Ray started before the deadline, or its workload stopped."""

    status_code = 503
    error_type = "head_start_failed"


class NodeWatch(Protocol):
    """What the runner needs of the provider (``HypercoreNodeProvider``): whether a node's
    workload runs (``refresh``: ask Hypercore now, not the cached List) and its logs."""

    def is_running(self, node_id: str, refresh: bool = False) -> bool: ...

    def node_logs(self, node_id: str) -> str: ...


class HypercoreCommandRunner(CommandRunnerInterface):
    """What ``ray up``'s updater can do with one Hypercore node (see the module docstring)."""

    def __init__(self, provider: NodeWatch, node_id: str, start_timeout_s: float) -> None:
        self._provider = provider
        self._node_id = node_id
        self._start_timeout_s = start_timeout_s

    def run(self, cmd: str | None = None, *args: Any, **kwargs: Any) -> str:
        command = _EXPORTS.sub("", cmd or "").strip()
        if not command or command == "ray stop":
            return ""
        if command == "uptime":
            if not self._provider.is_running(self._node_id):
                raise NoRemoteExecutionError(f"node {self._node_id} is not running yet")
            return ""
        if command.startswith("mkdir -p "):
            return ""
        if command.startswith("ray start"):
            self._wait_ray_started()
            return ""
        raise NoRemoteExecutionError(
            f"cannot run {command!r} on {self._node_id}: Hypercore workloads have no remote "
            "execution. Keep the *_commands lists in cluster.yaml empty; the image's node agent "
            "starts Ray"
        )

    def run_rsync_up(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        if target.rstrip("/") == BOOTSTRAP_CONFIG_TARGET:
            return  # travels in the head's env (HypercoreNodeProvider.bootstrap_config)
        raise NoRemoteExecutionError(
            f"cannot copy {source} to {target} on {self._node_id}: Hypercore workloads take no "
            "files. Keep file_mounts empty and bake files into the node image"
        )

    def run_rsync_down(
        self, source: str, target: str, options: dict[str, Any] | None = None
    ) -> None:
        raise NoRemoteExecutionError(
            f"cannot copy {source} from {self._node_id}: Hypercore workloads expose only their "
            "logs (Hypercore's Logs API)"
        )

    def remote_shell_command_str(self) -> str:
        return f"echo 'Hypercore workloads have no shell; read {self._node_id}'\"'\"'s logs'\n"

    def run_init(
        self, *, as_head: bool, file_mounts: dict[str, str], sync_run_yet: bool
    ) -> bool | None:
        return None

    def _wait_ray_started(self) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        logs = ""
        while time.monotonic() < deadline:
            if not self._provider.is_running(self._node_id, refresh=True):
                raise HeadStartError(
                    f"node {self._node_id} stopped before Ray started; its log ends:\n"
                    + _tail(logs)
                )
            logs = self._provider.node_logs(self._node_id)
            if RAY_STARTED_MARKER in logs:
                return
            time.sleep(LOG_POLL_S)
        raise HeadStartError(
            f"Ray did not start on {self._node_id} within {self._start_timeout_s:.0f} s; "
            "its log ends:\n" + _tail(logs)
        )


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:]) or "(empty)"
