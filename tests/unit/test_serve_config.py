"""The Serve config for ``serve deploy`` is valid for Ray 2.60 and builds the application."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

CONFIG = Path(__file__).resolve().parents[2] / "serve_app" / "serve_config.yaml"


def test_serve_config_validates_and_builds() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = config.applications
    module, _, attr = application.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    built = builder(application.args)
    assert type(built).__name__ == "Application"
    assert "ANTHROPIC_API_KEY" not in str(application.args)
