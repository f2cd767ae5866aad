from __future__ import annotations

import pytest
from pydantic import ValidationError

from actors import AgentSpec, Resources, placement_options
from hyperfleet.resources import MIG_RESOURCE_PREFIX, VM_SLOT_RESOURCE


def test_defaults() -> None:
    spec = AgentSpec()
    assert spec.max_turns == 20 and spec.max_sessions == 100
    assert spec.effective_isolation == "shared"
    assert AgentSpec(tools=("bash",)).effective_isolation == "vm"
    assert AgentSpec(tools=("bash",), isolation="shared").effective_isolation == "shared"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": ("rm",)}, "unknown tool 'rm'"),
        ({"tools": ("bash", "bash")}, "more than once"),
        ({"resources": {"gpus": 1.5}}, "whole number"),
        ({"resources": {"mig_profile": "big"}}, "not like '1g.10gb'"),
        ({"resources": {"mig_profile": "1g.10gb", "gpus": 0.5}}, "not both"),
        ({"replicas": {"min": 3, "max": 2}}, "above replicas.max"),
        ({"max_turns": 0}, "greater than or equal to 1"),
        ({"tool_limits": {"processes": 1}}, "greater than or equal to 8"),
        ({"tool_limits": {"swap_mb": 1}}, "Extra inputs"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_bad_specs_are_explained(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AgentSpec.model_validate(fields)


def test_the_owner_key_never_shows() -> None:
    spec = AgentSpec(anthropic_api_key="sk-ant-secret-123")  # type: ignore[arg-type]
    assert "sk-ant-secret-123" not in repr(spec)
    assert "sk-ant-secret-123" not in str(spec.public_json())
    assert "sk-ant-secret-123" not in spec.model_dump_json()
    assert spec.public_json()["credential"] == "own"
    assert AgentSpec().public_json()["credential"] == "platform"


def test_placement_from_resources() -> None:
    spec = AgentSpec(resources=Resources(cores=2, memory_mb=512, gpus=0.25))
    options = placement_options(spec)
    assert options["num_cpus"] == 2
    assert options["memory"] == 512 * 1024 * 1024
    assert options["num_gpus"] == 0.25
    assert options["resources"] == {}
    assert "label_selector" not in options


def test_placement_of_mig_vm_and_labels() -> None:
    spec = AgentSpec(
        tools=("bash",),
        resources=Resources(mig_profile="1g.10gb"),
        label_selector={"hyperfleet/pool": "gpu"},
    )
    options = placement_options(spec)
    assert options["resources"] == {MIG_RESOURCE_PREFIX + "1g.10gb": 1.0, VM_SLOT_RESOURCE: 1.0}
    assert options["label_selector"] == {"hyperfleet/pool": "gpu"}
    assert "num_gpus" not in options
