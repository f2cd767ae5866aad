"""Each package names its public surface in ``__all__``, and every name there exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "cluster.join",
    "cluster.emulator",
    "cluster.hypercore",
    "cluster.hypercore_standin",
    "cluster.loadtest",
    "serve_app",
    "actors",
    "actors.store",
    "actors.tools",
    "autoscaling",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert sorted(set(exported)) == sorted(exported)
    for member in exported:
        assert hasattr(module, member), f"{name}.{member} is in __all__ but missing"
