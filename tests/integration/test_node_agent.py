"""`hyperfleet node` for real: a head and workers as separate processes, each on its own 127.x
address, joined with one-time tickets, inspected through the head's GCS, drained by SIGTERM.

This cluster is the test's own (own GCS port, own HYPERFLEET_HOME and token), not the session's
`ray_cluster`: the pytest process is a driver of that one, so the head is queried from
subprocesses holding this head's token.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.join.tickets import TicketBook
from cluster.node.join_key import NodeKey
from hyperfleet.processes import ProcessId, descendants, free_port, stop, tail

from .prometheus_server import (  # the fixture is `prometheus`
    StartPrometheus,
    Target,
    panels_naming,
    prometheus_fixture,  # noqa: F401
)

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 10
# Ray's drain budget plus the agent's own grace for stopping Ray's processes.
STOP_DEADLINE_S = DRAIN_TIMEOUT_S + 30.0
POLL_S = 0.5

# Prints the GCS node table as JSON; run with this head's token in RAY_AUTH_TOKEN_PATH.
NODE_TABLE = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated import gcs_pb2
state = gcs_pb2.GcsNodeInfo.GcsNodeState
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values()
print(json.dumps([
    {"ip": n.node_manager_address, "state": state.Name(n.state), "instance_id": n.instance_id,
     "node_type_name": n.node_type_name, "labels": dict(n.labels), "temp_dir": n.temp_dir,
     "resources": dict(n.resources_total)}
    for n in nodes
]))
"""

# The join service's liveness check, as the join service runs it (own process, head's token).
LIVENESS = """
import os, sys
from pathlib import Path
from cluster.join.service import GcsLiveness
liveness = GcsLiveness(sys.argv[1], Path(os.environ["RAY_AUTH_TOKEN_PATH"]))
print(" ".join(liveness(i).value for i in sys.argv[2:]))
"""

# A driver of this head: waits for a spare worker on the node with instance id argv[3], starts an
# actor there the way a replica is placed, and prints the spares before and after and the actor's
# pid, as JSON.
SPARE_TAKEN = """
import json, os, sys, time
from pathlib import Path
import ray
from cluster.node.warm_workers import RayletClient
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], log_to_driver=False)
instance = sys.argv[3]
node = next(n for n in ray.nodes()
            if n["Alive"] and n["Labels"].get("hyperfleet/instance-id") == instance)
raylet = RayletClient(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}",
                      Path(os.environ["RAY_AUTH_TOKEN_PATH"]))
def spares(deadline_s=60):
    deadline = time.monotonic() + deadline_s
    while not (found := {w.pid for w in raylet.workers() if w.is_spare}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return sorted(found)
before = spares()
@ray.remote(num_cpus=1, resources={"hyperfleet_vm_slot": 1})
class Replica:
    def pid(self):
        return os.getpid()
replica = Replica.options(label_selector={"hyperfleet/instance-id": instance}).remote()
pid = ray.get(replica.pid.remote(), timeout=60)
print(json.dumps({"before": before, "actor": pid, "after": spares()}))
"""


@dataclass
class Head:
    agent: subprocess.Popen[bytes]
    home: Path
    ip: str
    gcs_address: str
    join_url: str
    log: Path

    def env(self) -> dict[str, str]:
        token = str(self.home / "ray_auth_token")
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token}

    def nodes(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-c", NODE_TABLE, self.gcs_address],
            env=self.env(),
            capture_output=True,
            timeout=60,
            check=True,
        )
        table: list[dict[str, Any]] = json.loads(out.stdout)
        return table

    def node(self, instance_id: str, state: str = "ALIVE") -> dict[str, Any] | None:
        try:
            table = self.nodes()
        except subprocess.CalledProcessError:  # the GCS is not up yet
            return None
        found = [n for n in table if n["instance_id"] == instance_id and n["state"] == state]
        return found[0] if found else None

    def take_spare(self, instance_id: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", SPARE_TAKEN, self.gcs_address, self.ip, instance_id],
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
        return result

    def liveness(self, *instance_ids: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", LIVENESS, self.gcs_address, *instance_ids],
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.split()

    def join(self, ticket: str, instance_id: str) -> tuple[int, dict[str, Any]]:
        """A join with ``ticket`` by someone who read it in env but has not the node's key."""
        body = NodeKey.generate().signed_request(ticket, instance_id, time.time())
        request = urllib.request.Request(  # noqa: S310
            self.join_url + "/v1/join",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # The pytest process's own (session) Ray token must not leak into the node.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "node"],
            env={**base, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S), **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(what: str, check: Callable[[], Any], logs: list[Path]) -> Any:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if (result := check()) is not None:
            return result
        time.sleep(POLL_S)
    raise AssertionError(f"{what} within {READY_TIMEOUT_S} s:\n" + "\n".join(tail(p) for p in logs))


def _wait_started(log: Path) -> None:
    """Until `ray start` says it runs: reading its log is cheaper than asking the GCS each time."""
    _wait_for(
        "ray start did not start",
        lambda: True if log.exists() and "Ray runtime started" in log.read_text() else None,
        [log],
    )


def _ray_start_env(agent: subprocess.Popen[bytes]) -> dict[str, str]:
    """The environment of the agent's `ray start` child, as the kernel holds it."""
    for process in descendants(agent.pid):
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        if b"start" in cmdline and b"--block" in cmdline:
            raw = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
            return dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    raise AssertionError("no `ray start` below the node agent")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (a node's address)
        return str(response.read().decode())


def _sample(text: str, series: str) -> float:
    """The value of one series in Prometheus's text format (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _alive(tree: list[ProcessId]) -> list[int]:
    return [process.pid for process in tree if process.alive()]


@pytest.fixture(scope="module")
def subnet() -> str:
    # Own 127.77.x.0/24 per run, so concurrent runs on this machine do not share addresses.
    return f"127.77.{random.randrange(1, 255)}"


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, subnet: str) -> Iterator[Head]:
    home = tmp_path_factory.mktemp("head")
    ip, gcs_port, join_port = f"{subnet}.1", free_port(), free_port()
    env = {
        "HYPERFLEET_NODE_ROLE": "head",
        "HYPERFLEET_INSTANCE_ID": "hf-head",
        "HYPERFLEET_NODE_TYPE": "head",
        "HYPERFLEET_CLUSTER": "it",
        "HYPERFLEET_NODE_IP": ip,
        "HYPERFLEET_RAY_PORT": str(gcs_port),
        "HYPERFLEET_JOIN_PORT": str(join_port),
        "HYPERFLEET_NUM_CPUS": "1",
        "HYPERFLEET_MEMORY_MB": "1024",
        "HYPERFLEET_HOME": str(home),
        # These nodes are no Hypercore workloads: the join service reads their consoles here.
        "HYPERFLEET_JOIN_CONSOLES_DIR": str(home / "consoles"),
    }
    log = home / "agent.log"
    agent = _agent(env, log)
    head = Head(agent, home, ip, f"{ip}:{gcs_port}", f"http://{ip}:{join_port}", log)
    try:
        _wait_started(log)
        _wait_for("the head is not ALIVE", lambda: head.node("hf-head"), [log])
        yield head
    finally:
        stop(agent, STOP_DEADLINE_S)


def _worker(
    head: Head, ip: str, instance_id: str, ticket: str, home: Path, **extra_env: str
) -> subprocess.Popen[bytes]:
    env = {
        "HYPERFLEET_NODE_ROLE": "worker",
        "HYPERFLEET_INSTANCE_ID": instance_id,
        "HYPERFLEET_NODE_TYPE": "cpu-agent",
        "HYPERFLEET_CLUSTER": "it",
        "HYPERFLEET_NODE_IP": ip,
        "HYPERFLEET_HEAD_ADDRESS": head.gcs_address,
        "HYPERFLEET_JOIN_URL": head.join_url,
        "HYPERFLEET_JOIN_TICKET": ticket,
        "HYPERFLEET_NUM_CPUS": "1",
        "HYPERFLEET_MEMORY_MB": "1024",
        "HYPERFLEET_RESOURCES": '{"hyperfleet_vm_slot": 1}',
        "HYPERFLEET_LABELS": '{"hyperfleet/pool": "agents"}',
        "HYPERFLEET_HOME": str(home),
        **extra_env,
    }
    # The worker's console, where the head's join service looks for its key.
    consoles = head.home / "consoles"
    consoles.mkdir(exist_ok=True)
    (consoles / f"{instance_id}.log").unlink(missing_ok=True)
    (home / "agent.log").parent.mkdir(parents=True, exist_ok=True)
    (home / "agent.log").touch()
    (consoles / f"{instance_id}.log").symlink_to(home / "agent.log")
    return _agent(env, home / "agent.log")


def test_head_keeps_its_token_and_exports_the_join_service(head: Head) -> None:
    token = head.home / "ray_auth_token"
    assert token.stat().st_mode & 0o777 == 0o600
    node = head.node("hf-head")
    assert node is not None and node["node_type_name"] == "head" and node["ip"] == head.ip
    assert node["labels"]["hyperfleet/node-type"] == "head"
    env = _ray_start_env(head.agent)
    assert env["HYPERFLEET_JOIN_DB"] == str(head.home / "join.db")
    assert env["HYPERFLEET_JOIN_URL"] == head.join_url
    assert env["HYPERFLEET_HEAD_ADDRESS"] == head.gcs_address
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert env["RAY_CLOUD_INSTANCE_ID"] == "hf-head"


@pytest.mark.timeout(240)
def test_a_replica_takes_the_spare_worker_and_another_is_started(
    head: Head, subnet: str, tmp_path: Path
) -> None:
    book = TicketBook(head.home / "join.db")
    home = tmp_path / "w2"
    worker = _worker(head, f"{subnet}.21", "hf-w2", book.mint("hf-w2", ttl_s=600), home)
    try:
        _wait_for("the worker did not join", lambda: head.node("hf-w2"), [home / "agent.log"])
        taken = head.take_spare("hf-w2")
        # The actor ran in a spare the agent had Ray start (no new process to wait for)...
        assert taken["before"] and taken["actor"] in taken["before"]
        # ...and the agent had the next spare started. (More than one only if a start took
        # longer than the keeper's window on a loaded machine: then it asked again.)
        assert taken["after"] and taken["actor"] not in taken["after"]
        assert "prestarting 1 spare" in (home / "agent.log").read_text()
    finally:
        stop(worker, STOP_DEADLINE_S)
        book.close()


@pytest.mark.timeout(240)
def test_worker_joins_with_a_ticket_drains_on_sigterm_and_rejoins(
    head: Head, subnet: str, tmp_path: Path, prometheus: StartPrometheus
) -> None:
    book = TicketBook(head.home / "join.db")
    ticket = book.mint("hf-w1", ttl_s=600)
    # Whoever read the ticket in the workload's env cannot join first, nor spend the ticket.
    status, body = head.join(ticket, "hf-w1")
    assert (status, body["error"]["type"]) == (409, "key_not_attested")
    assert book.lookup(ticket).redemptions == 0  # type: ignore[union-attr]
    home = tmp_path / "w1"
    metrics_port = free_port()
    worker = _worker(
        head, f"{subnet}.11", "hf-w1", ticket, home, HYPERFLEET_METRICS_PORT=str(metrics_port)
    )
    # Scraping both sides while the worker joins (its first scrape is seconds after its start).
    join_service = urllib.parse.urlsplit(head.join_url).netloc
    prom = prometheus([Target(f"{subnet}.11:{metrics_port}"), Target(join_service)])
    try:
        _wait_started(home / "agent.log")
        node = _wait_for(
            "the worker did not join", lambda: head.node("hf-w1"), [home / "agent.log"]
        )
        assert node["ip"] == f"{subnet}.11"
        assert node["node_type_name"] == "cpu-agent"
        labels = node["labels"]
        assert labels["hyperfleet/node-type"] == "cpu-agent"
        assert labels["hyperfleet/instance-id"] == "hf-w1"
        assert labels["hyperfleet/pool"] == "agents"
        assert labels["ray.io/node-group"] == "cpu-agent"  # Ray's own, from RAY_NODE_TYPE_NAME
        resources = node["resources"]
        assert resources["CPU"] == 1 and resources["hyperfleet_vm_slot"] == 1
        assert resources["object_store_memory"] == 307 * 1024 * 1024
        assert "GPU" not in resources

        # The worker got the head's token through the ticket, into a 0600 file...
        token = home / "ray_auth_token"
        assert token.read_text() == (head.home / "ray_auth_token").read_text()
        assert token.stat().st_mode & 0o777 == 0o600
        # ...and Ray never saw the ticket.
        env = _ray_start_env(worker)
        assert "HYPERFLEET_JOIN_TICKET" not in env
        assert env["RAY_CLOUD_INSTANCE_ID"] == "hf-w1" and env["RAY_NODE_TYPE_NAME"] == "cpu-agent"
        assert ticket not in json.dumps(env)

        # The node printed its key's fingerprint; a thief's key is not it, even now that the
        # fingerprint is public. A made-up ticket is unknown.
        assert "HYPERFLEET-JOIN-KEY SHA256:" in (home / "agent.log").read_text()
        status, body = head.join(ticket, "hf-w1")
        assert (status, body["error"]["type"]) == (409, "key_not_attested")
        assert book.lookup(ticket).redemptions == 1  # type: ignore[union-attr]
        status, body = head.join("made-up-ticket", "hf-w1")
        assert (status, body["error"]["type"]) == (401, "unknown_ticket")
        assert head.liveness("hf-w1", "hf-nobody") == ["alive", "absent"]

        # Both sides counted it: the worker's agent on its own address, the head's join
        # service at /metrics on its port (the thief's refusals among its answers).
        node_metrics = _scrape(f"http://{subnet}.11:{metrics_port}/metrics")
        assert 'hyperfleet_node_joins_total{outcome="joined"} 1.0' in node_metrics
        assert 'hyperfleet_node_state{state="running"} 1.0' in node_metrics
        service = _scrape(head.join_url + "/metrics")
        assert _sample(service, 'hyperfleet_join_attempts_total{outcome="joined"}') >= 1
        assert _sample(service, 'hyperfleet_join_attempts_total{outcome="unattested"}') >= 2
        assert _sample(service, 'hyperfleet_join_attempts_total{outcome="refused"}') >= 1
        # And every node panel of the dashboard has data in a real Prometheus: two scrapes after
        # the last join attempt give each increase() its two samples.
        prom.wait_for_scrape()
        prom.require_panel_data(
            panels_naming(
                "hyperfleet_node_state",
                "hyperfleet_join_attempts_total",
                "hyperfleet_node_joins_total",
            )
        )

        # SIGTERM to the agent: Ray drains the node, the agent exits 0, nothing is left behind.
        tree = descendants(worker.pid)
        os.kill(worker.pid, signal.SIGTERM)
        assert worker.wait(STOP_DEADLINE_S) == 0
        assert _alive(tree) == []
        assert "draining" in (home / "agent.log").read_text()
        _wait_for("the worker is not DEAD", lambda: head.node("hf-w1", "DEAD"), [head.log])
        assert head.liveness("hf-w1") == ["dead"]

        # Hypercore respawns a stopped workload from the same env: the same ticket rejoins
        # (the GCS lists its old node DEAD: proof of a respawn; the agent retries 409s through
        # the holdoff that follows a redemption).
        worker = _worker(head, f"{subnet}.12", "hf-w1", ticket, tmp_path / "w1-respawned")
        _wait_started(tmp_path / "w1-respawned" / "agent.log")
        again = _wait_for(
            "the respawned worker did not rejoin",
            lambda: head.node("hf-w1"),
            [tmp_path / "w1-respawned" / "agent.log"],
        )
        assert again["ip"] == f"{subnet}.12"

        # Terminated for good: the provider revokes, and the ticket is dead.
        book.revoke("hf-w1")
        status, body = head.join(ticket, "hf-w1")
        assert (status, body["error"]["type"]) == (409, "key_not_attested")
        assert book.lookup(ticket).revoked_at is not None  # type: ignore[union-attr]
    finally:
        stop(worker, STOP_DEADLINE_S)
        book.close()


@dataclass
class BlockedWorker:
    """A worker whose TMPDIR is a file: Ray cannot make its temp dir there and exits before its
    node registers, until the test puts a directory in its place (``unblock``)."""

    agent: subprocess.Popen[bytes]
    instance_id: str
    tmpdir: Path
    log: Path

    def unblock(self) -> None:
        self.tmpdir.unlink()
        self.tmpdir.mkdir()


@pytest.fixture
def blocked_worker(
    head: Head, subnet: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[BlockedWorker]:
    # A short path: Ray's socket paths below a node's TMPDIR must fit in 107 bytes, which
    # pytest's tmp_path is too long for.
    short = Path(tempfile.mkdtemp(prefix="hft-"))
    (short / "t").write_text("")
    number = request.param
    instance_id = f"hf-b{number}"
    book = TicketBook(head.home / "join.db")
    home = tmp_path / instance_id
    ticket = book.mint(instance_id, ttl_s=600)
    agent = _worker(head, f"{subnet}.{number}", instance_id, ticket, home, TMPDIR=str(short / "t"))
    try:
        yield BlockedWorker(agent, instance_id, short / "t", home / "agent.log")
    finally:
        stop(agent, STOP_DEADLINE_S)
        book.close()
        shutil.rmtree(short, ignore_errors=True)


def _logged(log: Path, text: str) -> bool | None:
    return True if log.exists() and text in log.read_text() else None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("blocked_worker", [31], indirect=True)
def test_a_worker_whose_ray_never_registered_starts_it_again(
    head: Head, subnet: str, blocked_worker: BlockedWorker
) -> None:
    # The agent asks the GCS, finds no new node of its own, and starts Ray again rather than
    # parking (which would hold an instance the autoscaler still waits for).
    log = blocked_worker.log
    _wait_for("the agent did not start Ray again", lambda: _logged(log, "again in"), [log])
    assert "waiting up to" not in log.read_text()
    blocked_worker.unblock()
    instance_id = blocked_worker.instance_id
    node = _wait_for("the worker did not join", lambda: head.node(instance_id), [log])
    assert node["ip"] == f"{subnet}.31"
    # Its own temp dir (its machine's), not the head's path.
    assert node["temp_dir"] == str(blocked_worker.tmpdir / "ray")

    # Once its node has registered, Ray ending (here its raylet killed; normally an idle
    # drain) is not retried: the GCS lists the node, and the agent parks for the provider.
    raylets = [
        process.pid
        for process in descendants(blocked_worker.agent.pid)
        if Path(f"/proc/{process.pid}/comm").read_text().strip() == "raylet"
    ]
    assert len(raylets) == 1
    os.kill(raylets[0], signal.SIGKILL)
    _wait_for("the agent did not park", lambda: _logged(log, "waiting up to"), [log])
    assert log.read_text().count("starting: ") == 2 and blocked_worker.agent.poll() is None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("blocked_worker", [41], indirect=True)
def test_a_worker_whose_ray_never_registers_parks_after_its_attempts(
    head: Head, blocked_worker: BlockedWorker
) -> None:
    # Three starts with 5 s and 10 s between them, then it waits for the provider's Stop (the
    # autoscaler gives up on an instance without Ray): a respawn could not rejoin.
    log = blocked_worker.log
    _wait_for("the agent did not give up", lambda: _logged(log, "waiting up to"), [log])
    text = log.read_text()
    assert text.count("Ray exited before this node registered") == 3
    assert "3 times: giving up" in text and text.count("starting: ") == 3
    assert head.node(blocked_worker.instance_id, "ALIVE") is None
    assert head.node(blocked_worker.instance_id, "DEAD") is None
    blocked_worker.agent.send_signal(signal.SIGTERM)
    assert blocked_worker.agent.wait(STOP_DEADLINE_S) == 0
