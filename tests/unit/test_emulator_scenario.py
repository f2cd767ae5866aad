from __future__ import annotations

import pytest

from cluster.emulator.config import EmulatorConfig
from cluster.emulator.scenario import ScenarioPicker
from cluster.emulator.wire import RequestError


def test_headers_override_the_flags() -> None:
    picker = ScenarioPicker(EmulatorConfig(ttft_ms=100, tps=50))
    default = picker.pick({}, seed=1, streaming=True)
    assert (default.ttft_s, default.tps) == (0.1, 50)
    headers = {"x-emulator-ttft-ms": "5", "x-emulator-tps": "0", "x-emulator-fault": "drop"}
    custom = picker.pick(headers, seed=1, streaming=True)
    assert (custom.ttft_s, custom.tps, custom.fault) == (0.005, 0, "drop")
    assert custom.token_due_s(1000) == 0.005


@pytest.mark.parametrize(
    "headers",
    [{"x-emulator-fault": "explode"}, {"x-emulator-tps": "fast"}, {"x-emulator-ttft-ms": "-1"}],
)
def test_bad_headers_are_a_400(headers: dict[str, str]) -> None:
    with pytest.raises(RequestError) as info:
        ScenarioPicker(EmulatorConfig()).pick(headers, seed=1, streaming=True)
    assert info.value.status == 400


def test_fault_fractions_are_seeded_and_roughly_right() -> None:
    config = EmulatorConfig(seed=7, fault_429=0.2, fault_drop=0.1)
    draws = [ScenarioPicker(config) for _ in range(2)]
    faults = [[p.pick({}, 0, streaming=True).fault for _ in range(2000)] for p in draws]
    assert faults[0] == faults[1]
    assert 300 < faults[0].count("429") < 500
    assert 120 < faults[0].count("drop") < 280
    picker = ScenarioPicker(config)
    plain = [picker.pick({}, 0, streaming=False).fault for _ in range(500)]
    assert "drop" not in plain and "429" in plain


def test_jitter_is_seeded_per_request() -> None:
    picker = ScenarioPicker(EmulatorConfig(ttft_ms=100, tps=100, jitter=0.5))
    a, b = picker.pick({}, seed=3, streaming=True), picker.pick({}, seed=3, streaming=True)
    assert a.ttft_s == b.ttft_s and 0.05 <= a.ttft_s <= 0.15
    assert picker.pick({}, seed=4, streaming=True).ttft_s != a.ttft_s


def test_config_refuses_fractions_over_one() -> None:
    with pytest.raises(ValueError, match="more than 1"):
        EmulatorConfig(fault_429=0.6, fault_500=0.6)
