"""The Serve application builder: one function for ``serve run``, ``serve deploy`` and Python.

    serve run hera_ray.serve.app:build_app config_file=hera.yaml
    serve deploy deploy/serve_config.yaml        # import_path: hera_ray.serve.app:build_app

``args`` are HeraConfig fields (nested dicts allowed) and/or ``config_file`` (YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud_node.deployment import build_cloud_deployment
from hera_ray.config import HeraConfig, load_settings
from hera_ray.estimators.trained import estimators_path
from hera_ray.serve.estimators import build_estimator_deployment
from hera_ray.serve.keys import load_keys_file
from hera_ray.serve.openai_api import HeraIngress


def build_app(args: dict[str, Any] | None = None, config: HeraConfig | None = None, estimators_serving: str | None = None):
    """``estimators_serving``: an estimator set to serve instead of ``hera.estimators`` (``hera learn
    --apply``), given to the estimator deployment alone, so nothing else is redeployed."""
    if config is None:
        args = dict(args or {})
        config_file = args.pop("config_file", None)
        config = load_settings(HeraConfig, Path(config_file) if config_file else None, **args)
    cloud = build_cloud_deployment(config.cloud)
    estimators = None
    if config.hera.enabled:
        h = config.hera
        path = estimators_path(h.estimators)  # fails here, at build time, if the folder holds no manifest
        serving = str(estimators_path(estimators_serving)) if estimators_serving else None
        estimators = build_estimator_deployment(str(path), threads=h.threads, num_cpus=h.num_cpus, replicas=h.replicas,
                                                serving=serving)
    if config.ingress.api_keys_file is not None:
        load_keys_file(config.ingress.api_keys_file)  # a bad keys file fails here, at build time, not at first request
    return HeraIngress.options(
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(config.model_dump(mode="json"), cloud, estimators)


def build_from_settings(args: dict[str, Any]):
    """The builder ``hera up`` deploys declaratively (a Serve config: ``import_path`` this, ``args``
    ``{"config": <HeraConfig as JSON>}``), so that changing one deployment's ``user_config`` later
    (``hera learn --apply``) is an in-place update, not a redeploy of the whole app."""
    return build_app(config=HeraConfig.model_validate(args["config"]))
