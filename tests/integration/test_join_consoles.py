"""``HypercoreConsoles`` against a real Hypercore stand-in: the join service finds a node's key in
the console of the instance's own workloads, through List and Logs, and in no other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.hypercore import HypercoreClient, SpawnRequest
from cluster.hypercore_standin import StandinHandle, start_standin
from cluster.join.consoles import HypercoreConsoles, attested
from cluster.node.join_key import NodeKey, console_line

from .waiting import wait_until

NODE_IMAGE = "test.local/node:latest"
OTHER_IMAGE = "test.local/other:latest"
# Prints what the workload's env says its fingerprint line is, then sleeps: in the node image, as
# the node agent does; in another image, as a stranger with a copied env would.
PRINT_AND_SLEEP = "import os, time; print(os.environ['LINE'], flush=True); time.sleep(3600)"
CATALOG = {
    "images": {
        NODE_IMAGE: {"argv": ["{python}", "-c", PRINT_AND_SLEEP]},
        OTHER_IMAGE: {"argv": ["{python}", "-c", PRINT_AND_SLEEP]},
    }
}


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinHandle]:
    root = tmp_path_factory.mktemp("standin")
    (root / "catalog.json").write_text(json.dumps(CATALOG))
    handle = start_standin(root, refresh_interval_s=0.5, catalog=root / "catalog.json")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def client(standin: StandinHandle) -> Iterator[HypercoreClient]:
    client = standin.client()
    yield client
    client.close()


def _spawn(client: HypercoreClient, image: str, instance_id: str, ticket: str, line: str) -> str:
    env = (
        f"HYPERFLEET_INSTANCE_ID={instance_id}",
        f"HYPERFLEET_JOIN_TICKET={ticket}",
        f"LINE={line}",
    )
    return client.spawn(SpawnRequest(cores=1, memory_mb=128, image_ref=image, env=env)).id


def test_only_the_instance_s_own_workloads_attest_a_key(
    client: HypercoreClient, tmp_path: Path
) -> None:
    node, stranger, other_ticket = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    spawned = [
        _spawn(client, NODE_IMAGE, "hf-a", "ticket-a", console_line(node.fingerprint)),
        # The same env in an image that is not the cluster's: someone else's Spawn.
        _spawn(client, OTHER_IMAGE, "hf-a", "ticket-a", console_line(stranger.fingerprint)),
        # The cluster's image, but another ticket: not this node's Spawn request.
        _spawn(client, NODE_IMAGE, "hf-a", "ticket-b", console_line(other_ticket.fingerprint)),
    ]
    consoles = HypercoreConsoles(client, [NODE_IMAGE])
    try:

        def printed() -> list[str] | None:
            texts = list(consoles.consoles("hf-a", "ticket-a"))
            return texts if texts and all("JOIN-KEY" in text for text in texts) else None

        found = wait_until(printed, "the node's console in List and Logs", timeout_s=30)
        assert len(found) == 1
        assert attested(found, node.fingerprint)
        assert not attested(found, stranger.fingerprint)
        assert not attested(found, other_ticket.fingerprint)
        assert consoles.consoles("hf-nobody", "ticket-a") == []
    finally:
        for workload_id in spawned:
            client.stop(workload_id)
