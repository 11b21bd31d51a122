"""The Serve config file names a builder that builds the application from its args."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from hera_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_validates_and_its_builder_builds():
    raw = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    (app_cfg,) = schema.applications
    module, _, name = app_cfg.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    app = builder(app_cfg.args)
    assert type(app).__name__ == "Application"


def test_a_bad_autoscaling_config_fails_at_build_time():
    from hera_ray.serve.app import build_app

    with pytest.raises(ConfigError, match="min_replicas must be <= max_replicas"):
        build_app({"cloud": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}})
