"""The node agent without Ray: env -> settings -> the exact `ray start` command, and joining."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from prometheus_client import generate_latest

from cluster.cli import commands as cli
from cluster.node import agent as node
from cluster.node import ray_start
from cluster.node.agent import (
    EXIT_RAY_FAILED,
    EXIT_STOPPED,
    AfterRayExit,
    NodeAgent,
    RayNeverRegistered,
    StopFlag,
    after_ray_exit,
    with_autoscaling_config_file,
)
from cluster.node.gpus import Gpu, Inventory, MigInstance, RayGpuOptions, ray_gpu_options
from cluster.node.join import HeadServices, JoinFailed, RestartBudget, redeem_ticket
from cluster.node.join_key import JoinClaim, NodeKey, seal, verify
from cluster.node.metrics import JoinAttempt, NodeMetrics
from cluster.node.ray_start import RayStart, detect_node_ip, ray_start_command
from cluster.node.settings import NodeRole, NodeSettings, NodeSettingsError
from hyperfleet.processes import reap_orphans

H100 = "NVIDIA H100 80GB HBM3"
CPU_NODE = ray_gpu_options(Inventory())
TOKEN = Path("/var/lib/hyperfleet/ray_auth_token")
RAY = "/opt/venv/bin/ray"


def worker_env(**overrides: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/bin",
        "HYPERFLEET_NODE_ROLE": "worker",
        "HYPERFLEET_INSTANCE_ID": "hf-7f3a",
        "HYPERFLEET_NODE_TYPE": "cpu-agent",
        "HYPERFLEET_CLUSTER": "fleet",
        "HYPERFLEET_NODE_IP": "10.88.0.7",
        "HYPERFLEET_HEAD_ADDRESS": "10.88.0.2:6385",
        "HYPERFLEET_JOIN_URL": "http://10.88.0.2:8571/",
        "HYPERFLEET_JOIN_TICKET": "ticket-abc",
        "HYPERFLEET_NUM_CPUS": "2",
        "HYPERFLEET_MEMORY_MB": "4096",
        "HYPERFLEET_RESOURCES": '{"hyperfleet_vm_slot": 1}',
        "HYPERFLEET_LABELS": '{"hyperfleet/pool": "agents"}',
        "HYPERFLEET_TAGS": '{"ray-node-kind": "worker"}',
        "HYPERFLEET_HOME": "/var/lib/hyperfleet",
        "RAY_AUTH_TOKEN": "must-not-reach-ray",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v != "<unset>"}


def head_env(**overrides: str) -> dict[str, str]:
    env = worker_env(
        HYPERFLEET_NODE_ROLE="head",
        HYPERFLEET_INSTANCE_ID="hf-head",
        HYPERFLEET_NODE_TYPE="head",
        HYPERFLEET_NODE_IP="10.88.0.2",
        HYPERFLEET_HEAD_ADDRESS="<unset>",
        HYPERFLEET_JOIN_URL="<unset>",
        HYPERFLEET_JOIN_TICKET="<unset>",
        HYPERFLEET_RESOURCES="<unset>",
        HYPERFLEET_LABELS="<unset>",
        HYPERFLEET_RAY_PORT="6390",
    )
    env.update(overrides)
    return env


def command_for(
    env: dict[str, str], gpu: RayGpuOptions = CPU_NODE, head: HeadServices | None = None
) -> RayStart:
    settings = NodeSettings.from_env(env)
    assert settings.node_ip is not None
    return ray_start_command(settings, gpu, settings.node_ip, TOKEN, env, RAY, head)


def test_worker_command() -> None:
    command = command_for(worker_env())
    assert command.argv == (
        RAY,
        "start",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=10.88.0.7",
        "--address=10.88.0.2:6385",
        "--dashboard-agent-listen-port=0",
        "--temp-dir=/tmp/ray",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--memory={(4096 - 1228) * 1024 * 1024}",
        f"--object-store-memory={1228 * 1024 * 1024}",
        '--resources={"hyperfleet_vm_slot": 1.0}',
        "--labels=hyperfleet/accelerator=none,hyperfleet/cluster=fleet,"
        "hyperfleet/instance-id=hf-7f3a,hyperfleet/node-type=cpu-agent,hyperfleet/pool=agents",
    )
    env = command.env
    assert env["RAY_CLOUD_INSTANCE_ID"] == "hf-7f3a"
    assert env["RAY_NODE_TYPE_NAME"] == "cpu-agent"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(TOKEN)
    assert env["FORWARDED_ALLOW_IPS"] == ""  # uvicorn takes no client address from a header
    assert env["PATH"] == "/usr/bin"
    # The ticket is spent and a stray token would override the file: neither reaches Ray.
    assert "HYPERFLEET_JOIN_TICKET" not in env and "RAY_AUTH_TOKEN" not in env
    assert "RAY_enable_autoscaler_v2" not in env and "HYPERFLEET_JOIN_DB" not in env


def test_the_agent_can_name_the_raylet_port_and_keeps_spares_by_default() -> None:
    settings = NodeSettings.from_env(worker_env())
    assert settings.warm_workers == 1
    assert NodeSettings.from_env(worker_env(HYPERFLEET_WARM_WORKERS="0")).warm_workers == 0
    command = ray_start_command(settings, CPU_NODE, "10.88.0.7", TOKEN, {}, RAY, None, 40123)
    assert "--node-manager-port=40123" in command.argv
    assert not any(a.startswith("--node-manager-port") for a in command_for(worker_env()).argv)


def test_no_port_for_the_raylet_means_no_spares_not_a_failed_node(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = NodeSettings.from_env(worker_env())
    assert 1024 <= ray_start.raylet_port_for(settings, "127.0.0.1") <= 65535

    def no_port(ip: str) -> int:
        raise OSError(97, "Address family not supported by protocol")

    monkeypatch.setattr(ray_start, "free_port_on", no_port)
    assert ray_start.raylet_port_for(settings, "::1") == 0
    assert "keeping none" in caplog.text
    off = NodeSettings.from_env(worker_env(HYPERFLEET_WARM_WORKERS="0"))
    assert ray_start.raylet_port_for(off, "127.0.0.1") == 0


def test_head_command_exports_the_join_service(tmp_path: Path) -> None:
    services = HeadServices(join_db=tmp_path / "join.db", join_url="http://10.88.0.2:8571")
    command = command_for(head_env(), head=services)
    assert "--head" in command.argv and "--port=6390" in command.argv
    assert not any(arg.startswith("--address") for arg in command.argv)
    assert "--autoscaling-config" not in " ".join(command.argv)
    assert command.env["HYPERFLEET_JOIN_DB"] == str(tmp_path / "join.db")
    assert command.env["HYPERFLEET_JOIN_URL"] == "http://10.88.0.2:8571"
    assert command.env["HYPERFLEET_HEAD_ADDRESS"] == "10.88.0.2:6390"
    assert "RAY_enable_autoscaler_v2" not in command.env


def test_head_with_an_autoscaling_config_runs_autoscaler_v2(tmp_path: Path) -> None:
    config = tmp_path / "autoscaler.yaml"
    config.write_text("cluster_name: x\n")
    services = HeadServices(join_db=tmp_path / "join.db", join_url="http://10.88.0.2:8571")
    command = command_for(head_env(HYPERFLEET_AUTOSCALING_CONFIG=str(config)), head=services)
    assert f"--autoscaling-config={config}" in command.argv
    assert command.env["RAY_enable_autoscaler_v2"] == "1"
    assert command.env["AUTOSCALER_UPDATE_INTERVAL_S"] == "1"  # not Ray's 5 s
    # An instance where Ray never runs is replaced after 10 minutes, not Ray's hour.
    assert command.env["RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S"] == "600"
    env = head_env(
        HYPERFLEET_AUTOSCALING_CONFIG=str(config),
        AUTOSCALER_UPDATE_INTERVAL_S="3",
        RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S="1800",
    )
    own = command_for(env, head=services).env
    assert own["AUTOSCALER_UPDATE_INTERVAL_S"] == "3"
    assert own["RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S"] == "1800"


def test_every_node_uses_its_own_machines_temp_dir(tmp_path: Path) -> None:
    # A worker would otherwise take the head's path: nodes sharing a host shared one session
    # directory and raced for its socket names. Ray's own order: RAY_TMPDIR, TMPDIR, /tmp.
    for env, expected in (
        (worker_env(), "/tmp/ray"),
        (worker_env(TMPDIR="/vm/tmp"), "/vm/tmp/ray"),
        (worker_env(TMPDIR="/vm/tmp", RAY_TMPDIR="/ray-tmp"), "/ray-tmp/ray"),
    ):
        assert f"--temp-dir={expected}" in command_for(env).argv
    services = HeadServices(join_db=tmp_path / "join.db", join_url="http://10.88.0.2:8571")
    head = command_for(head_env(TMPDIR="/vm/tmp"), head=services)
    assert "--temp-dir=/vm/tmp/ray" in head.argv


def test_mig_node_command() -> None:
    mig = (
        MigInstance("MIG-1", "1g.10gb"),
        MigInstance("MIG-2", "1g.10gb"),
        MigInstance("MIG-3", "3g.40gb"),
    )
    gpu = ray_gpu_options(Inventory(gpus=(Gpu(0, "GPU-a", H100, 81559, mig),)))
    resources = '{"hyperfleet_mig_1g.10gb": 7, "hyperfleet_vm_slot": 1}'
    command = command_for(worker_env(HYPERFLEET_RESOURCES=resources), gpu)
    assert command.env["CUDA_VISIBLE_DEVICES"] == "MIG-1,MIG-2,MIG-3"
    assert "--num-gpus=3" in command.argv
    # What the hardware has wins over what the env claims.
    assert json.loads(_flag(command, "--resources")) == {
        "hyperfleet_mig_1g.10gb": 2.0,
        "hyperfleet_mig_3g.40gb": 1.0,
        "hyperfleet_vm_slot": 1.0,
    }
    labels = dict(pair.split("=") for pair in _flag(command, "--labels").split(","))
    assert labels["hyperfleet/accelerator"] == "h100-80gb-hbm3"
    assert labels["hyperfleet/mig-profiles"] == "1g_10gb.3g_40gb"


def test_identity_labels_cannot_be_overridden_by_the_env() -> None:
    labels_env = '{"hyperfleet/node-type": "gpu", "hyperfleet/instance-id": "other"}'
    command = command_for(worker_env(HYPERFLEET_LABELS=labels_env))
    labels = dict(pair.split("=") for pair in _flag(command, "--labels").split(","))
    assert labels["hyperfleet/node-type"] == "cpu-agent"
    assert labels["hyperfleet/instance-id"] == "hf-7f3a"


def test_without_memory_or_cpus_ray_sizes_the_node() -> None:
    command = command_for(worker_env(HYPERFLEET_MEMORY_MB="", HYPERFLEET_NUM_CPUS=""))
    flags = " ".join(command.argv)
    assert "--memory" not in flags and "--object-store-memory" not in flags
    assert "--num-cpus" not in flags


def _flag(command: RayStart, name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in command.argv if arg.startswith(name + "=")]
    return value


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"HYPERFLEET_NODE_ROLE": "boss"}, "HYPERFLEET_NODE_ROLE"),
        ({"HYPERFLEET_INSTANCE_ID": "<unset>"}, "HYPERFLEET_INSTANCE_ID"),
        ({"HYPERFLEET_INSTANCE_ID": "x" * 257}, "HYPERFLEET_INSTANCE_ID"),
        ({"HYPERFLEET_NODE_TYPE": "-bad"}, "HYPERFLEET_NODE_TYPE"),
        ({"HYPERFLEET_NUM_CPUS": "two"}, "HYPERFLEET_NUM_CPUS"),
        ({"HYPERFLEET_MEMORY_MB": "64"}, "HYPERFLEET_MEMORY_MB"),
        ({"HYPERFLEET_NODE_IP": "10.88.0"}, "HYPERFLEET_NODE_IP"),
        ({"HYPERFLEET_HEAD_ADDRESS": "10.88.0.2"}, "HYPERFLEET_HEAD_ADDRESS"),
        ({"HYPERFLEET_JOIN_URL": "ftp://head/"}, "HYPERFLEET_JOIN_URL"),
        ({"HYPERFLEET_JOIN_TICKET": "<unset>"}, "HYPERFLEET_JOIN_TICKET"),
        ({"HYPERFLEET_RESOURCES": "{not json"}, "HYPERFLEET_RESOURCES"),
        ({"HYPERFLEET_RESOURCES": '{"CPU": 4}'}, "HYPERFLEET_RESOURCES"),
        ({"HYPERFLEET_RESOURCES": '{"slot": -1}'}, "HYPERFLEET_RESOURCES"),
        ({"HYPERFLEET_LABELS": '{"ray.io/node-id": "x"}'}, "HYPERFLEET_LABELS"),
        ({"HYPERFLEET_LABELS": '{"pool": "a,b"}'}, "HYPERFLEET_LABELS"),
        ({"HYPERFLEET_LABELS": '{"pool": 3}'}, "HYPERFLEET_LABELS"),
        ({"HYPERFLEET_AUTOSCALING_CONFIG": "/etc/x.yaml"}, "HYPERFLEET_AUTOSCALING_CONFIG"),
        ({"HYPERFLEET_AUTOSCALING_CONFIG_JSON": "{}"}, "HYPERFLEET_AUTOSCALING_CONFIG_JSON"),
        ({"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "-1"}, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"),
        ({"HYPERFLEET_WARM_WORKERS": "9"}, "HYPERFLEET_WARM_WORKERS"),
        ({"HYPERFLEET_WARM_WORKERS": "-1"}, "HYPERFLEET_WARM_WORKERS"),
    ],
)
def test_bad_env_is_named_and_exits_2(
    overrides: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = worker_env(**overrides)
    with pytest.raises(NodeSettingsError, match=named):
        NodeSettings.from_env(env)
    assert node.main(env) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyperfleet node: ") and named in err
    assert "ticket-abc" not in err  # the ticket is never echoed


def test_head_needs_an_existing_autoscaling_config() -> None:
    with pytest.raises(NodeSettingsError, match="no file"):
        NodeSettings.from_env(head_env(HYPERFLEET_AUTOSCALING_CONFIG="/nonexistent.yaml"))
    with pytest.raises(NodeSettingsError, match="not both"):
        NodeSettings.from_env(
            head_env(
                HYPERFLEET_AUTOSCALING_CONFIG=__file__, HYPERFLEET_AUTOSCALING_CONFIG_JSON="{}"
            )
        )
    with pytest.raises(NodeSettingsError, match="HYPERFLEET_AUTOSCALING_CONFIG_JSON"):
        NodeSettings.from_env(head_env(HYPERFLEET_AUTOSCALING_CONFIG_JSON="[1,"))


def test_an_inline_autoscaling_config_becomes_the_file_ray_reads(tmp_path: Path) -> None:
    config = {"cluster_name": "fleet", "provider": {"type": "external"}}
    env = head_env(
        HYPERFLEET_HOME=str(tmp_path), HYPERFLEET_AUTOSCALING_CONFIG_JSON=json.dumps(config)
    )
    settings = with_autoscaling_config_file(NodeSettings.from_env(env))
    assert settings.autoscaling_config is not None
    assert json.loads(settings.autoscaling_config.read_text()) == config
    services = HeadServices(join_db=tmp_path / "join.db", join_url="http://10.88.0.2:8571")
    command = ray_start_command(settings, CPU_NODE, "10.88.0.2", TOKEN, env, RAY, services)
    assert f"--autoscaling-config={settings.autoscaling_config}" in command.argv
    assert command.env["RAY_enable_autoscaler_v2"] == "1"


def test_an_instance_id_that_is_no_label_value_is_still_the_cloud_instance_id() -> None:
    command = command_for(worker_env(HYPERFLEET_INSTANCE_ID="hf-" + "a" * 70))
    assert command.env["RAY_CLOUD_INSTANCE_ID"] == "hf-" + "a" * 70
    assert "hyperfleet/instance-id" not in _flag(command, "--labels")


def test_cli_runs_the_node_agent_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HYPERFLEET_NODE_ROLE", "worker")
    monkeypatch.delenv("HYPERFLEET_INSTANCE_ID", raising=False)
    assert cli.main(["node"]) == 2
    assert "HYPERFLEET_INSTANCE_ID" in capsys.readouterr().err


def test_node_ip_is_the_source_address_toward_the_head() -> None:
    assert ipaddress.ip_address(detect_node_ip(("127.0.0.9", 6385))).is_loopback


# redeem_ticket against a real HTTP server on loopback, scripted answer by answer.


class ScriptedJoin(BaseHTTPRequestHandler):
    script: ClassVar[list[tuple[int, dict[str, object], dict[str, str]]]] = []
    seen: ClassVar[list[tuple[str, dict[str, object]]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.client_address[0], body))
        status, answer, headers = self.script.pop(0) if self.script else (500, {}, {})
        if "token" in answer:  # the head seals the token to the key the request carries
            plain = str(answer.pop("token")).encode()
            instance_id = str(answer["instance_id"])
            answer = {
                **answer,
                "sealed_token": seal(plain, str(body["encryption_key"]), instance_id),
            }
        payload = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def join_server() -> Iterator[str]:
    ScriptedJoin.script, ScriptedJoin.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJoin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _refusal(kind: str) -> dict[str, object]:
    return {"error": {"type": kind, "message": f"refused: {kind}"}}


def test_redeem_retries_while_the_old_node_is_alive(join_server: str) -> None:
    ScriptedJoin.script = [
        (409, _refusal("ticket_in_use"), {"Retry-After": "1"}),
        (503, _refusal("liveness_unknown"), {}),
        (200, {"token": "tok", "instance_id": "hf-7f3a"}, {}),
    ]
    key = NodeKey.generate()
    assert redeem_ticket(join_server, "t", "hf-7f3a", key, "127.0.0.1", 30, StopFlag()) == "tok"
    bodies = [body for _, body in ScriptedJoin.seen]
    assert len(bodies) == 3 and len({str(body["nonce"]) for body in bodies}) == 3
    for body in bodies:  # each a fresh request, signed by the node's key
        signature = str(body.pop("signature"))
        assert body["ticket"] == "t" and body["instance_id"] == "hf-7f3a"
        verify(JoinClaim(**body), signature, time.time())  # type: ignore[arg-type]
        assert JoinClaim(**body).fingerprint == key.fingerprint  # type: ignore[arg-type]


def test_redeem_counts_each_request_by_outcome(join_server: str) -> None:
    metrics = NodeMetrics()
    ScriptedJoin.script = [
        (409, _refusal("key_not_attested"), {"Retry-After": "1"}),
        (503, _refusal("liveness_unknown"), {}),
        (200, {"token": "tok", "instance_id": "hf-7f3a"}, {}),
    ]
    key = NodeKey.generate()
    redeem_ticket(join_server, "t", "hf-7f3a", key, "127.0.0.1", 30, StopFlag(), metrics.count_join)
    ScriptedJoin.script = [(403, _refusal("ticket_revoked"), {})]
    with pytest.raises(JoinFailed):
        redeem_ticket(
            join_server, "t", "hf-7f3a", key, "127.0.0.1", 30, StopFlag(), metrics.count_join
        )
    text = generate_latest(metrics.registry).decode()
    assert 'hyperfleet_node_joins_total{outcome="retry"} 2.0' in text
    assert 'hyperfleet_node_joins_total{outcome="joined"} 1.0' in text
    assert 'hyperfleet_node_joins_total{outcome="failed"} 1.0' in text


def test_a_join_that_runs_out_of_time_counts_its_last_request_as_failed() -> None:
    counted: list[JoinAttempt] = []
    with pytest.raises(JoinFailed, match="could not join"):
        redeem_ticket(
            "http://127.0.0.1:9", "t", "i", NodeKey.generate(), "127.0.0.1", 2.5, StopFlag(),
            counted.append,
        )  # fmt: skip
    assert counted[-1] is JoinAttempt.FAILED and set(counted[:-1]) == {JoinAttempt.RETRY}


def test_the_agents_state_follows_ray() -> None:
    agent = NodeAgent(NodeSettings.from_env(worker_env()), worker_env())
    stopper = threading.Timer(1.0, agent.request_stop, args=(15,))
    stopper.start()
    try:
        assert agent._supervise(_ray_that_exits(), None) == EXIT_STOPPED
    finally:
        stopper.cancel()
    # Ray exited, the worker parked, then SIGTERM: it says it is stopping.
    text = generate_latest(agent.metrics.registry).decode()
    assert 'hyperfleet_node_state{state="stopping"} 1.0' in text
    assert 'hyperfleet_node_state{state="parked"} 0.0' in text


def test_redeem_refuses_a_token_not_sealed_for_it(join_server: str) -> None:
    ScriptedJoin.script = [(200, {"token": "tok", "instance_id": "hf-other"}, {})]
    with pytest.raises(JoinFailed, match="not this one"):
        redeem_ticket(join_server, "t", "hf-7f3a", NodeKey.generate(), "127.0.0.1", 30, StopFlag())
    ScriptedJoin.script = [(200, {"sealed_token": "A" * 80, "instance_id": "hf-7f3a"}, {})]
    with pytest.raises(JoinFailed, match="does not open"):
        redeem_ticket(join_server, "t", "hf-7f3a", NodeKey.generate(), "127.0.0.1", 30, StopFlag())


def test_redeem_sends_from_the_node_address(join_server: str) -> None:
    ScriptedJoin.script = [(200, {"token": "tok", "instance_id": "i"}, {})]
    redeem_ticket(join_server, "t", "i", NodeKey.generate(), "127.0.0.23", 10, StopFlag())
    assert ScriptedJoin.seen[0][0] == "127.0.0.23"


@pytest.mark.parametrize("status", [401, 403, 410, 400])
def test_redeem_gives_up_on_a_final_refusal(join_server: str, status: int) -> None:
    ScriptedJoin.script = [(status, _refusal("no"), {})]
    with pytest.raises(JoinFailed, match=f"HTTP {status}: refused: no") as failed:
        redeem_ticket(join_server, "t", "i", NodeKey.generate(), "127.0.0.1", 30, StopFlag())
    assert failed.value.exit_code == 3
    assert len(ScriptedJoin.seen) == 1


def test_redeem_never_echoes_a_200_answer(
    join_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 answer is the token reply: even a malformed one stays out of errors and logs."""
    ScriptedJoin.script = [(200, {"tokn": "the-secret-token"}, {})]
    with caplog.at_level("DEBUG"), pytest.raises(JoinFailed, match="no token reply") as failed:
        redeem_ticket(join_server, "t", "i", NodeKey.generate(), "127.0.0.1", 30, StopFlag())
    assert "the-secret-token" not in str(failed.value) + caplog.text


def test_redeem_stops_at_its_deadline_when_the_head_is_down() -> None:
    with pytest.raises(JoinFailed, match="could not join"):
        redeem_ticket(
            "http://127.0.0.1:9", "t", "i", NodeKey.generate(), "127.0.0.1", 2.5, StopFlag()
        )


def test_redeem_stops_when_asked() -> None:
    stopping = StopFlag()
    threading.Timer(0.5, stopping.set).start()
    # Well before its 60 s deadline, and saying why.
    with pytest.raises(JoinFailed, match="asked to stop"):
        redeem_ticket("http://127.0.0.1:9", "t", "i", NodeKey.generate(), "127.0.0.1", 60, stopping)


def test_orphans_are_reaped_and_own_children_left_to_popen() -> None:
    own = subprocess.Popen(["sh", "-c", "exit 3"])
    orphan = subprocess.Popen(["sh", "-c", "exit 0"])
    deadline = time.monotonic() + 10
    for pid in (own.pid, orphan.pid):  # both exit and, with nobody waiting, stay zombies
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert reap_orphans({own.pid}) == [orphan.pid]
    assert not Path(f"/proc/{orphan.pid}").exists()
    assert own.wait(10) == 3  # its status was left for Popen
    orphan.poll()  # settles the Popen object (its child is gone)


def test_the_join_service_restart_budget_is_windowed() -> None:
    now = [0.0]
    budget = RestartBudget(max_restarts=2, window_s=600, clock=lambda: now[0])
    assert budget.take()
    now[0] = 300.0
    assert budget.take()
    assert not budget.take()  # a crash loop gives up...
    now[0] = 599.0
    assert not budget.take()
    now[0] = 600.0  # ...but crashes spread over a long life do not add up
    assert budget.take()
    assert not budget.take()
    now[0] = 900.0
    assert budget.take() and not budget.take()


# When `ray start --block` exits on its own: the head exits (Hypercore restarts it), a worker
# (drained as idle by the autoscaler) parks until the provider terminates it.


def test_after_ray_exit_head_exits_worker_parks() -> None:
    assert after_ray_exit(NodeRole.HEAD) is AfterRayExit.EXIT
    assert after_ray_exit(NodeRole.WORKER) is AfterRayExit.PARK


def _ray_that_exits() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", "exit 0"], start_new_session=True)


def test_a_worker_whose_ray_exits_parks_until_sigterm() -> None:
    agent = NodeAgent(NodeSettings.from_env(worker_env()), worker_env())
    stopper = threading.Timer(1.0, agent.request_stop, args=(15,))
    stopper.start()
    try:
        assert agent._supervise(_ray_that_exits(), None) == EXIT_STOPPED
    finally:
        stopper.cancel()


def test_a_worker_whose_node_never_registered_is_not_parked() -> None:
    # The autoscaler is still waiting for Ray on this instance: parking would hold it (and the
    # demand it was launched for) until the autoscaler gives up on it.
    agent = NodeAgent(NodeSettings.from_env(worker_env()), worker_env())
    with pytest.raises(RayNeverRegistered):
        agent._supervise(_ray_that_exits(), None, lambda: False)


@pytest.mark.parametrize("registered", [True, None])
def test_a_worker_whose_node_registered_or_may_have_parks(registered: bool | None) -> None:
    agent = NodeAgent(NodeSettings.from_env(worker_env()), worker_env())
    stopper = threading.Timer(1.0, agent.request_stop, args=(15,))
    stopper.start()
    try:
        assert agent._supervise(_ray_that_exits(), None, lambda: registered) == EXIT_STOPPED
    finally:
        stopper.cancel()


def test_a_parked_worker_exits_non_zero_after_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "PARK_AFTER_RAY_EXIT_S", 0.5)
    agent = NodeAgent(NodeSettings.from_env(worker_env()), worker_env())
    assert agent._supervise(_ray_that_exits(), None) == EXIT_RAY_FAILED


def test_a_head_whose_ray_exits_exits_non_zero() -> None:
    agent = NodeAgent(NodeSettings.from_env(head_env()), head_env())
    assert agent._supervise(_ray_that_exits(), None) == EXIT_RAY_FAILED


def test_the_join_service_reads_consoles_where_the_autoscaling_config_says(tmp_path: Path) -> None:
    from autoscaling.provider_config import DEFAULT_IMAGE
    from cluster.node.join import DEFAULT_NODE_IMAGE, console_source_args

    assert DEFAULT_NODE_IMAGE == DEFAULT_IMAGE
    config = tmp_path / "autoscaling.yaml"
    config.write_text(
        "provider: {hypercore_address: '127.0.0.1:8100', transport: http}\n"
        "available_node_types:\n"
        "  cpu: {node_config: {cores: 1}}\n"
        "  gpu: {node_config: {image: 'ghcr.io/hyperfleet/node-gpu:latest'}}\n"
    )
    base = {"HYPERFLEET_NODE_ROLE": "head", "HYPERFLEET_INSTANCE_ID": "h",
            "HYPERFLEET_NODE_TYPE": "head", "HYPERFLEET_HOME": str(tmp_path)}  # fmt: skip
    settings = NodeSettings.from_env({**base, "HYPERFLEET_AUTOSCALING_CONFIG": str(config)})
    assert console_source_args(settings) == [
        "--hypercore-address=127.0.0.1:8100",
        "--hypercore-transport=http",
        "--image=ghcr.io/hyperfleet/node-gpu:latest",
        f"--image={DEFAULT_IMAGE}",
    ]
    consoles = NodeSettings.from_env({**base, "HYPERFLEET_JOIN_CONSOLES_DIR": str(tmp_path)})
    assert console_source_args(consoles) == [f"--consoles-dir={tmp_path}"]
    assert console_source_args(NodeSettings.from_env(base)) == []
