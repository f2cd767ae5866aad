"""Where the head reads an instance's console, to see which join key the node printed there.

A node agent prints its join key's fingerprint to its console at boot
(``cluster.node.join_key.console_line``). The console is written only by the workload itself, and
Hypercore returns it through ``Logs`` to anyone, so a fingerprint there is public but can be put
there only by a process running in the workload: the private key never leaves it.
``HypercoreConsoles`` reads it the way the provider finds an instance's workloads: List, the
workloads whose env carries the instance id and this very ticket (a respawn under a new workload id
carries the same env), and of those only workloads of the cluster's own node images, so a workload
someone else Spawned with a copied env and an image of their own does not count. Then ``Logs`` of
each.

A console that shows more than one fingerprint is not believed: one workload runs one agent with
one key, so a second fingerprint means something else wrote a line that looks like one.
``DirectoryConsoles`` is the same check for nodes that are not Hypercore workloads (the head can
read their console files, as in the node agent's integration tests).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Protocol

from cluster.hypercore import HypercoreClient, HypercoreError, UnknownWorkload
from cluster.node.join_key import fingerprints_in

from .tickets import JoinError

logger = logging.getLogger("hyperfleet.join")

INSTANCE_ID_ENV = "HYPERFLEET_INSTANCE_ID"
JOIN_TICKET_ENV = "HYPERFLEET_JOIN_TICKET"
MAX_CONSOLE_BYTES = 1024 * 1024
CONSOLES_TIMEOUT_S = 10.0
# A workload's console may show its fingerprint before List's next refresh (about 5 s) shows
# the workload: the node retries after this.
NOT_ATTESTED_RETRY_S = 5.0
JOIN_REFUSED_RETRY_S = 10.0


class KeyNotAttested(JoinError):
    """No console of the instance shows the request's key (yet): the node retries; anyone else
    keeps getting this, and the ticket is untouched."""

    status_code = 409
    error_type = "key_not_attested"
    retryable = True


class ConsolesUnavailable(JoinError):
    """The consoles could not be read (Hypercore unreachable); retry later."""

    status_code = 503
    error_type = "consoles_unavailable"
    retryable = True


class Consoles(Protocol):
    """The console text of each workload that currently runs ``instance_id`` from ``ticket``.

    Contract: returns only consoles written by workloads that were started from the ticket's
    Spawn request (never one a third party could start with text of its own); an empty sequence
    when none runs now; raises ``ConsolesUnavailable`` when it cannot tell. Read-only and safe
    to call concurrently; blocking, bounded by a timeout.
    """

    def consoles(self, instance_id: str, ticket: str) -> Sequence[str]: ...


def attested(consoles: Sequence[str], key_fingerprint: str) -> bool:
    """Whether some console shows ``key_fingerprint`` as its only fingerprint."""
    for console in consoles:
        shown = fingerprints_in(console)
        if len(shown) > 1:
            logger.warning("a console shows %d join key fingerprints: ignored", len(shown))
            continue
        if shown == {key_fingerprint}:
            return True
    return False


class HypercoreConsoles:
    """``Consoles`` through Hypercore's List and Logs.

    Args:
        client: a client of the cluster's Hypercore.
        images: the cluster's node images (``image_ref``s); a workload of another image is not
            the provider's.
        timeout_s: per call.
    """

    def __init__(
        self,
        client: HypercoreClient,
        images: Collection[str],
        timeout_s: float = CONSOLES_TIMEOUT_S,
    ) -> None:
        if not images:
            raise ValueError("HypercoreConsoles needs the cluster's node images")
        self._client = client
        self._images = frozenset(images)
        self._timeout_s = timeout_s

    def consoles(self, instance_id: str, ticket: str) -> Sequence[str]:
        wanted = {f"{INSTANCE_ID_ENV}={instance_id}", f"{JOIN_TICKET_ENV}={ticket}"}
        try:
            hosts = self._client.list(timeout_s=self._timeout_s)
            workload_ids = [
                workload.id
                for host in hosts
                for workload in host.workloads
                if workload.request.image_ref in self._images
                and wanted <= set(workload.request.env)
            ]
            texts: list[str] = []
            for workload_id in workload_ids:
                try:
                    texts.append(self._client.logs(workload_id, timeout_s=self._timeout_s))
                except UnknownWorkload:
                    continue  # stopped since List's refresh
        except HypercoreError as e:
            raise ConsolesUnavailable(
                f"cannot read the consoles of instance {instance_id} from Hypercore: {e}",
                retry_after_s=NOT_ATTESTED_RETRY_S,
            ) from e
        return [text[-MAX_CONSOLE_BYTES:] for text in texts]


class DirectoryConsoles:
    """``Consoles`` for nodes that are not Hypercore workloads: ``<directory>/<instance id>.log``
    is the console of the node with that instance id, written by that node alone (the operator
    sees to it). The ticket is not checked: no one but the node writes the file."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory.resolve()

    def consoles(self, instance_id: str, ticket: str) -> Sequence[str]:
        if Path(instance_id).name != instance_id or instance_id in (".", ".."):
            return []  # no path out of the directory
        path = self._directory / f"{instance_id}.log"
        try:
            with path.open("rb") as console:
                size = console.seek(0, 2)
                console.seek(max(0, size - MAX_CONSOLE_BYTES))
                return [console.read().decode(errors="replace")]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConsolesUnavailable(f"cannot read {path}: {e}") from e


class NoConsoles:
    """``Consoles`` for a head with no way to read its nodes' consoles: refuses every join."""

    def consoles(self, instance_id: str, ticket: str) -> Sequence[str]:
        raise ConsolesUnavailable(
            "this head cannot read its nodes' consoles (no Hypercore in its autoscaling config,"
            " no HYPERFLEET_JOIN_CONSOLES_DIR): no node can join",
            retry_after_s=JOIN_REFUSED_RETRY_S,
        )
