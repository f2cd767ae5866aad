"""The wire forms: Go's encoding/json of Hypercore's protobuf structs, and the typed models."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.hypercore import HostState, InvalidSpawnRequest, SpawnRequest, Workload, gojson, proto


def _state() -> Any:
    state = proto.NodeStateResponse()
    state.node.id = "host"
    state.node.ip = "u_complete"
    workload = state.workloads.add(id="w1")
    workload.source_request.cores = 2
    workload.source_request.image_ref = "a/b:1"
    workload.source_request.ports[8080] = 80
    workload.source_request.ports[10] = 1
    workload.source_request.env.extend(["A=<b>&c", "B="])
    state.beacon.node_signature = b"\x00\xff"
    state.beacon.timestamp = 2**40
    state.beacon.node_capabilities.extend(["container", "vm"])
    state.beacon.price_per_gb = 0.01
    return state


def test_encoding_is_gos_not_protobufs_json() -> None:
    encoded = gojson.to_go(_state())
    assert encoded == {
        "node": {"id": "host", "ip": "u_complete"},
        "workloads": [
            {
                "id": "w1",
                # zero memory and false dry_run omitted; map keys as strings, sorted as strings
                "source_request": {
                    "cores": 2,
                    "image_ref": "a/b:1",
                    "ports": {"10": 1, "8080": 80},
                    "env": ["A=<b>&c", "B="],
                },
            }
        ],
        # int64 stays a number, bytes are base64; unset policy and empty signature omitted
        "beacon": {
            "node_signature": "AP8=",
            "timestamp": 2**40,
            "node_capabilities": ["container", "vm"],
            "price_per_gb": 0.01,
        },
    }
    assert list(encoded["workloads"][0]["source_request"]["ports"]) == ["10", "8080"]


def test_a_set_empty_message_is_an_empty_object() -> None:
    state = proto.NodeStateResponse()
    state.policy.SetInParent()
    assert gojson.to_go(state) == {"policy": {}}
    assert gojson.to_go(proto.VmSpawnResponse()) == {}


def test_the_encoder_escapes_like_gos() -> None:
    body = gojson.dumps({"error": "<a> & \u2028 é"})
    assert body == b'{"error":"\\u003ca\\u003e \\u0026 \\u2028 \xc3\xa9"}\n'
    assert json.loads(body) == {"error": "<a> & \u2028 é"}


def test_decoding_round_trips_and_is_lenient_like_gos() -> None:
    state = _state()
    assert gojson.from_go(gojson.to_go(state), proto.NodeStateResponse) == state
    message = gojson.from_go(
        {"CORES": 1, "Image_Ref": "x", "unknown": [1], "env": None, "ports": {"1": 2}},
        proto.VmSpawnRequest,
    )
    assert (message.cores, message.image_ref, dict(message.ports)) == (1, "x", {1: 2})
    states = gojson.from_go({"states": [None, {}]}, proto.NodesStateResponse)
    assert len(states.states) == 2


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (
            {"cores": "1"},
            "json: cannot unmarshal string into Go struct field VmSpawnRequest.cores "
            "of type uint32",
        ),
        (
            {"cores": 2**32},
            f"json: cannot unmarshal number {2**32} into Go struct field "
            "VmSpawnRequest.cores of type uint32",
        ),
        (
            {"cores": 1.5},
            "json: cannot unmarshal number 1.5 into Go struct field "
            "VmSpawnRequest.cores of type uint32",
        ),
        (
            {"dry_run": 1},
            "json: cannot unmarshal number 1 into Go struct field "
            "VmSpawnRequest.dry_run of type bool",
        ),
        (
            {"env": "A=B"},
            "json: cannot unmarshal string into Go struct field VmSpawnRequest.env of type []",
        ),
        ("x", "json: cannot unmarshal string into Go value of type cluster.VmSpawnRequest"),
    ],
)
def test_decoding_errors_carry_gos_texts(data: Any, text: str) -> None:
    with pytest.raises(gojson.GoJsonError) as error:
        gojson.from_go(data, proto.VmSpawnRequest)
    assert str(error.value) == text


def test_body_parse_errors_carry_gos_texts() -> None:
    assert gojson.loads(b' {"a": 1} trailing') == {"a": 1}  # Decode reads one value
    for body, text in [(b"", "EOF"), (b"  ", "EOF"), (b'{"a":', "unexpected EOF")]:
        with pytest.raises(gojson.GoJsonError, match=f"^{text}$"):
            gojson.loads(body)
    with pytest.raises(gojson.GoJsonError, match=r"^invalid character 'x'"):
        gojson.loads(b"x")


def test_spawn_requests_round_trip_through_the_message() -> None:
    request = SpawnRequest(
        cores=4, memory_mb=8192, image_ref="r:1", ports={9000: 90}, env=("A=1", "A=2")
    )
    message = request.to_message()
    assert (message.memory, list(message.env)) == (8192, ["A=1", "A=2"])
    assert SpawnRequest.from_message(message) == request


def test_spawn_requests_are_frozen_copies() -> None:
    ports = {1: 2}
    request = SpawnRequest(cores=1, memory_mb=1, image_ref="r", ports=ports, env=["A=1"])  # type: ignore[arg-type]
    ports[3] = 4
    assert dict(request.ports) == {1: 2} and request.env == ("A=1",)
    with pytest.raises(TypeError):
        request.ports[5] = 6  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"ports": {80: 70000}}, "got invalid port 70000 greater than 65535"),
        ({"ports": {70000: 80}}, "got invalid port 70000 greater than 65535"),
        ({"ports": {0: 80}}, "got invalid port 0"),
        ({"cores": -1}, "cores -1 is outside"),
        ({"memory_mb": 2**32}, "memory_mb"),
        ({"image_ref": ""}, "image_ref is empty"),
        ({"env": ("NOEQUALS",)}, "is not K=V"),
    ],
)
def test_validate_refuses_what_hypercore_would(changes: dict[str, Any], complaint: str) -> None:
    fields: dict[str, Any] = {"cores": 1, "memory_mb": 64, "image_ref": "r:1"} | changes
    with pytest.raises(InvalidSpawnRequest, match=complaint):
        SpawnRequest(**fields).validate()


def test_host_states_come_from_the_message() -> None:
    host = HostState.from_message(_state())
    assert (host.node_id, host.node_ip) == ("host", "u_complete")
    assert host.workloads == (
        Workload(
            "w1",
            SpawnRequest(
                cores=2,
                memory_mb=0,
                image_ref="a/b:1",
                ports={8080: 80, 10: 1},
                env=("A=<b>&c", "B="),
            ),
        ),
    )
    assert HostState.from_message(proto.NodeStateResponse()) == HostState("", "", ())
