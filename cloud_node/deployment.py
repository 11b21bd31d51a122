"""The cloud LLM as a Ray Serve deployment: one backend per replica, autoscaled by Serve.

``build_cloud_deployment(config)`` returns the bound deployment; the ingress calls
``generate`` / ``stream`` on its handle. Errors cross the process boundary as data
(``{"error": {...}}``) so the caller re-raises the same HeraError, message intact.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Callable

from ray import serve
from ray.serve.config import AutoscalingConfig

from cloud_node.backends import LLMBackend, make_backend
from hera_ray.config import CloudLLMConfig
from hera_ray.errors import ConfigError, HeraError, error_to_dict
from hera_ray.generation import GenerationResult, params_from_dict

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "CloudLLM"
DEFAULT_DEPLOYMENT_OPTIONS: dict[str, Any] = {
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
    "graceful_shutdown_timeout_s": 60,
    "graceful_shutdown_wait_loop_s": 2,
}


class CloudLLMServer:
    """One replica: a backend built from the config (``backend_factory`` lets callers inject one)."""

    def __init__(self, config: dict[str, Any], backend_factory: Callable[[CloudLLMConfig], LLMBackend] | None = None):
        self.config = CloudLLMConfig.model_validate(config)
        self.backend = (backend_factory or make_backend)(self.config)
        log.info("cloud LLM replica ready: %s backend, model %s", self.config.backend, self.backend.model_id)

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return (await self.backend.generate(params_from_dict(params))).to_dict()
        except HeraError as e:
            return {"error": error_to_dict(e)}

    async def stream(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            async for item in self.backend.stream(params_from_dict(params)):
                yield {"final": item.to_dict()} if isinstance(item, GenerationResult) else {"delta": item}
        except HeraError as e:
            yield {"error": error_to_dict(e)}

    async def model_id(self) -> str:
        return self.backend.model_id

    async def check_health(self) -> None:
        await self.backend.check_health()

    async def load(self) -> dict[str, Any]:
        """This replica's load (requests holding a slot, waiting, done), where the engine counts it."""
        worker = getattr(self.backend, "worker", None)
        return dict(worker.load().__dict__) if worker is not None else {}

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def deployment_options(config: CloudLLMConfig) -> dict[str, Any]:
    """Serve options for the cloud deployment, checked against Serve's own AutoscalingConfig."""
    autoscaling = config.autoscaling.model_dump()
    if autoscaling["min_replicas"] > autoscaling["max_replicas"]:
        raise ConfigError("cloud.autoscaling: min_replicas must be <= max_replicas")
    try:
        AutoscalingConfig(**autoscaling)
    except Exception as e:  # Serve's pydantic model says what is wrong
        raise ConfigError(f"cloud.autoscaling is not a valid Serve autoscaling config: {e}") from e
    return {
        **DEFAULT_DEPLOYMENT_OPTIONS,
        "name": DEPLOYMENT_NAME,
        "autoscaling_config": autoscaling,
        # llama.cpp refuses past its own queue; let Serve hold no more than that per replica.
        "max_ongoing_requests": config.slots + config.max_queue,
        "ray_actor_options": {"num_cpus": config.num_cpus, **({"resources": dict(config.resources)} if config.resources else {})},
    }


def build_cloud_deployment(config: CloudLLMConfig):
    return serve.deployment(CloudLLMServer, **deployment_options(config)).bind(config.model_dump(mode="json"))


def replica_states(app_name: str = "hera") -> dict[str, int]:
    """The cloud deployment's replicas by state (``{"RUNNING": 2, "STARTING": 1}``), as ``serve status``
    shows them; empty if the app or deployment is not there. Needs a connected Ray driver."""
    status = serve.status().applications.get(app_name)
    deployment = status.deployments.get(DEPLOYMENT_NAME) if status else None
    return {str(k.value if hasattr(k, "value") else k): v for k, v in (deployment.replica_states if deployment else {}).items()}
