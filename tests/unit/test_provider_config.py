"""cluster.yaml through Ray's own config preparation, the provider's config checks, and the node env
that carries a node's identity through Hypercore's List."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from autoscaling import HypercoreNodeProvider, NodeConfig, ProviderConfig, ProviderConfigError
from autoscaling.node_env import NodeSpec, listed_node, node_env, parse_env
from autoscaling.provider import HEAD_CONFIG_KEY
from cluster.node.gpus import Inventory, ray_gpu_options
from cluster.node.ray_start import ray_start_command
from cluster.node.settings import NodeSettings

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
# What Ray's external-provider path reads without a default (commands.py, updater.py, util.py).
# Each with the error Ray's preparation raises when it is missing.
REQUIRED_KEYS: dict[str, type[Exception]] = {
    "cluster_name": jsonschema.ValidationError,
    "max_workers": AssertionError,
    "provider": KeyError,
    "head_node_type": ValueError,
    "available_node_types": jsonschema.ValidationError,
    "file_mounts": KeyError,
    "cluster_synced_files": RuntimeError,
    "initialization_commands": KeyError,
    "setup_commands": KeyError,
    "head_setup_commands": KeyError,
    "worker_setup_commands": KeyError,
    "head_start_ray_commands": KeyError,
}


def _cluster_yaml() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CLUSTER_YAML.read_text())
    return config


def _prepare(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does to the file before it creates anything (commands._bootstrap_config),
    plus the keys ``get_or_create_head_node`` reads from the result."""
    prepared: dict[str, Any] = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    for key in ("auth", "file_mounts", "initialization_commands", "head_start_ray_commands"):
        prepared[key]
    return HypercoreNodeProvider.bootstrap_config(prepared)


def test_cluster_yaml_passes_rays_preparation() -> None:
    prepared = _prepare(_cluster_yaml())
    assert prepared["provider"]["module"] == "autoscaling.provider.HypercoreNodeProvider"
    assert prepared["provider"]["disable_node_updaters"] is True
    types = prepared["available_node_types"]
    assert types["cpu"]["resources"]["hyperfleet_vm_slot"] == 1
    assert {"head", "cpu", "gpu", "gpu_mig"} <= set(types)
    # The head gets the cluster config in env; its own copy does not nest another.
    head_copy = prepared["provider"][HEAD_CONFIG_KEY]
    assert HEAD_CONFIG_KEY not in head_copy["provider"]
    assert head_copy["available_node_types"] == types


@pytest.mark.parametrize(("key", "error"), REQUIRED_KEYS.items())
def test_a_missing_required_key_fails(key: str, error: type[Exception]) -> None:
    config = _cluster_yaml()
    del config[key]
    with pytest.raises(error):
        _prepare(config)


def test_provider_config_defaults_and_errors() -> None:
    parsed = ProviderConfig.parse(
        {"type": "external", "disable_node_updaters": True, "_config_cache_path": "/tmp/x"}
    )
    assert parsed.hypercore_address == "127.0.0.1:8100"  # the local stand-in
    assert parsed.default_image == "ghcr.io/hyperfleet/node:latest"
    with pytest.raises(ProviderConfigError, match="hypercore_adress"):
        ProviderConfig.parse({"disable_node_updaters": True, "hypercore_adress": "x:1"})
    with pytest.raises(ProviderConfigError, match="transport"):
        ProviderConfig.parse({"disable_node_updaters": True, "transport": "ssh"})
    with pytest.raises(ProviderConfigError, match="disable_node_updaters: true"):
        ProviderConfig.parse({"type": "external"})
    with pytest.raises(ProviderConfigError, match="hypercore_address"):
        ProviderConfig.parse({"disable_node_updaters": True, "hypercore_address": "no-port"})


def test_node_config_errors_name_the_node_type() -> None:
    assert NodeConfig.parse({"cores": 2, "memory_mb": 2048}, "cpu").image is None
    with pytest.raises(ProviderConfigError, match=r"'cpu'.*memory_mb"):
        NodeConfig.parse({"cores": 2}, "cpu")
    with pytest.raises(ProviderConfigError, match="InstanceType"):
        NodeConfig.parse({"cores": 2, "memory_mb": 2048, "InstanceType": "m5"}, "cpu")
    config = _prepare(_cluster_yaml())
    config["available_node_types"]["cpu"]["node_config"]["cores"] = 0
    with pytest.raises(ProviderConfigError, match="'cpu'"):
        HypercoreNodeProvider.bootstrap_config(config)


def test_node_types_declare_what_the_node_agent_gives_ray() -> None:
    """The autoscaler places a demand for memory only on a node type that declares memory, so
    each type declares the share of its VM's memory the node agent hands Ray."""
    prepared = _prepare(_cluster_yaml())
    filled = HypercoreNodeProvider.fillout_available_node_types_resources(prepared)
    cpu = filled["available_node_types"]["cpu"]
    assert cpu["resources"]["CPU"] == 2
    memory_mb = cpu["node_config"]["memory_mb"]
    settings = NodeSettings.from_env(
        {
            "HYPERFLEET_NODE_ROLE": "worker",
            "HYPERFLEET_INSTANCE_ID": "hf-c-1",
            "HYPERFLEET_NODE_TYPE": "cpu",
            "HYPERFLEET_HEAD_ADDRESS": "10.88.0.2:6386",
            "HYPERFLEET_JOIN_URL": "http://10.88.0.2:7000",
            "HYPERFLEET_JOIN_TICKET": "t",
            "HYPERFLEET_MEMORY_MB": str(memory_mb),
            "HYPERFLEET_HOME": "/tmp/hf-test-home",
        }
    )
    command = ray_start_command(
        settings, ray_gpu_options(Inventory()), "10.88.0.3", Path("/t"), {}, "ray"
    )
    assert f"--memory={cpu['resources']['memory']}" in command.argv
    # What the operator wrote wins.
    prepared["available_node_types"]["cpu"]["resources"]["memory"] = 5
    refilled = HypercoreNodeProvider.fillout_available_node_types_resources(prepared)
    assert refilled["available_node_types"]["cpu"]["resources"]["memory"] == 5


def test_node_env_round_trips_through_list() -> None:
    tags = {"ray-node-type": "worker", "ray-user-node-type": "cpu", "ray-launch-request": "r1"}
    spec = NodeSpec(
        node_id="hf-c1-abc",
        cluster_name="c1",
        role="worker",
        node_type="cpu",
        tags=tags,
        resources={"CPU": 2, "memory": 1024 * 1024 * 1024, "hyperfleet_vm_slot": 1},
        labels={"hyperfleet/pool": "cpu"},
        memory_mb=2048,
        head_address="10.88.0.2:6386",
        join_url="http://10.88.0.2:7000",
        join_ticket="t",
    )
    env = node_env(spec)
    values = parse_env(env)
    assert values["HYPERFLEET_NUM_CPUS"] == "2"
    assert values["HYPERFLEET_MEMORY_MB"] == "2048"
    assert json.loads(values["HYPERFLEET_RESOURCES"]) == {"hyperfleet_vm_slot": 1}
    assert json.loads(values["HYPERFLEET_LABELS"]) == {"hyperfleet/pool": "cpu"}
    assert "RAY_AUTH_TOKEN" not in values and "HYPERFLEET_RAY_PORT" not in values
    # The image's env comes first in a real workload; List echoes only the Spawn env.
    node = listed_node("w-1", ("PATH=/bin", *env), "c1")
    assert node is not None
    assert (node.node_id, node.workload_id, dict(node.tags)) == ("hf-c1-abc", "w-1", tags)
    assert listed_node("w-1", env, "other-cluster") is None
    assert listed_node("w-2", ("HYPERFLEET_CLUSTER=c1",), "c1") is None


def test_a_tombstone_stays_until_list_has_not_shown_its_node_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoscaling import provider_state
    from autoscaling.provider_state import ProviderState

    state = ProviderState(tmp_path, "c1")
    state.bury("n1")
    state.bury("n2")
    # Age alone releases nothing while List still shows the node.
    monkeypatch.setattr(provider_state, "TOMBSTONE_UNSEEN_S", 0.0)
    for _ in range(10):
        state.note_listed(["n1", "n2"])
    assert state.buried() == {"n1", "n2"}
    for _ in range(provider_state.TOMBSTONE_UNSEEN_REFRESHES - 1):
        state.note_listed(["n2"])
    state.note_listed(["n1", "n2"])  # seen again: counting starts over
    for _ in range(provider_state.TOMBSTONE_UNSEEN_REFRESHES - 1):
        state.note_listed(["n2"])
    assert state.buried() == {"n1", "n2"}
    state.note_listed(["n2"])
    assert state.buried() == {"n2"}
    # Unseen often enough but not for long enough: kept.
    monkeypatch.setattr(provider_state, "TOMBSTONE_UNSEEN_S", 3600.0)
    for _ in range(2 * provider_state.TOMBSTONE_UNSEEN_REFRESHES):
        state.note_listed([])
    assert ProviderState(tmp_path, "c1").buried() == {"n2"}
    assert ProviderState(tmp_path, "c2").buried() == set()
    # The hard bound releases even a node List keeps showing.
    monkeypatch.setattr(provider_state, "TOMBSTONE_MAX_AGE_S", 0.0)
    state.note_listed(["n2"])
    assert state.buried() == set()


def test_concurrent_tag_updates_are_all_kept(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from autoscaling.provider_state import ProviderState

    def update(i: int) -> None:
        ProviderState(tmp_path, "c").update_tags("n", {f"k{i}": str(i)})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(update, range(40)))
    assert ProviderState(tmp_path, "c").tag_updates()["n"] == {f"k{i}": str(i) for i in range(40)}
