"""Configuration models: one pydantic-settings class per component.

Every field has a description; the CLI builds its flags from these (``hera_ray.cli``), so a
setting is declared once. Values come, highest first, from CLI flags, ``HERA_*`` environment
variables, a YAML file (``--config``), then the defaults, which run on a laptop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hera_ray.errors import ConfigError

MiB = 1024 * 1024


class EdgeNodeConfig(BaseSettings):
    """An edge node: a llama.cpp SLM served over gRPC (``hera edge serve``)."""

    model_config = SettingsConfigDict(env_prefix="HERA_EDGE_", extra="forbid")

    model: str = Field("smollm2-135m", description="Bundled model name (smollm2-135m, qwen2.5-coder-1.5b) or path to a GGUF file.")
    model_id: str | None = Field(None, description="Model id advertised to the registry and matched against requests; default: the model name, or the GGUF file's stem.")
    node_id: str | None = Field(None, description="Unique id of this node in the registry; default: <hostname>-<port>.")
    host: str = Field("127.0.0.1", description="Address to bind the EdgeWorker gRPC server to (0.0.0.0 for all interfaces).")
    port: int = Field(50061, ge=0, le=65535, description="Port of the EdgeWorker gRPC server (0 picks a free one).")
    advertise_address: str | None = Field(None, description="host:port the cluster dials to reach this node; default: host:port.")
    registry: str | None = Field(None, description="host:port of the EdgeRegistry to register with; none serves standalone.")
    token_file: Path | None = Field(None, description="File holding this node's registry token (first non-comment line).")
    slots: int = Field(1, ge=1, le=64, description="Requests decoded at once; each slot holds its own llama.cpp context.")
    max_queue: int = Field(8, ge=0, le=10_000, description="Requests that may wait for a slot; more get RESOURCE_EXHAUSTED.")
    n_ctx: int = Field(2048, ge=128, le=131_072, description="Context window in tokens (prompt + completion).")
    threads: int = Field(1, ge=1, le=256, description="llama.cpp threads per slot. One is fastest for a small SLM on a small box (SmolLM2-135M here: 132 tok/s on 1 thread, 44 on 2); raise it for larger models.")
    price_per_1k_tokens: float = Field(0.0, ge=0, description="Price this node charges per 1,000 tokens (prompt + completion), for the cost ledger.")
    drain_timeout_s: float = Field(120.0, gt=0, description="On SIGTERM, how long to wait for accepted work to finish before stopping.")
    max_message_bytes: int = Field(4 * MiB, ge=1024, description="Largest gRPC message the server accepts or sends.")


class RegistryConfig(BaseSettings):
    """The EdgeRegistry gRPC server that edge nodes register with (``hera registry serve``)."""

    model_config = SettingsConfigDict(env_prefix="HERA_REGISTRY_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind the registry's gRPC server to (0.0.0.0 for all interfaces).")
    port: int = Field(50051, ge=0, le=65535, description="Port of the registry's gRPC server.")
    token_file: Path | None = Field(None, description="File of accepted node tokens, one per line ('#' starts a comment). Required.")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60, description="How often nodes are told to heartbeat, in seconds.")
    missed_heartbeats: int = Field(3, ge=1, le=100, description="Heartbeats a node may miss before it is marked down.")
    max_message_bytes: int = Field(4 * MiB, ge=1024, description="Largest gRPC message the server accepts or sends.")


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], config_file: Path | None = None, **overrides: Any) -> SettingsT:
    """Build ``cls`` from flags (``overrides``, None meaning unset) > env > YAML file > defaults."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            file_values = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from e
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings")

    class _FromFile(PydanticBaseSettingsSource):
        def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
            return file_values.get(field_name), field_name, False

        def __call__(self) -> dict[str, Any]:
            return dict(file_values)

    class _Layered(cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(cls_, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            return (init_settings, env_settings, _FromFile(settings_cls))

    given = {k: v for k, v in overrides.items() if v is not None}
    return cls.model_validate(_Layered(**given).model_dump())


def read_tokens(path: Path) -> list[str]:
    """The tokens in a token file: one per line, blank lines and '#' comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read token file {path}: {e.strerror or e}") from e
    tokens = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not tokens:
        raise ConfigError(f"token file {path} holds no token")
    return tokens


# -- the cluster side (Ray) ------------------------------------------------------------------------


class AutoscalingSettings(BaseModel):
    """Serve autoscaling for the cloud LLM deployment (checked against Serve's AutoscalingConfig at build)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="How long load must stay high before adding a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, description="How long load must stay low before removing a replica.")
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window over which load is averaged.")


class CloudLLMConfig(BaseModel):
    """The cloud LLM: a Ray Serve deployment with a pluggable backend."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["llama_cpp", "vllm", "openai"] = Field("llama_cpp", description="Engine: llama_cpp (CPU default), vllm (in-process vLLM), or openai (an OpenAI-compatible endpoint).")
    model: str = Field("qwen2.5-coder-1.5b", description="Bundled model name or path (llama_cpp: GGUF; vllm: Hugging Face folder); for openai, the remote model name.")
    model_id: str | None = Field(None, description="Model id the deployment answers to; default: the model name.")
    n_ctx: int = Field(4096, ge=256, description="Context window in tokens.")
    slots: int = Field(1, ge=1, le=64, description="llama_cpp: requests decoded at once per replica.")
    max_queue: int = Field(16, ge=0, description="llama_cpp: requests that may wait for a slot per replica; more get 429/RESOURCE_EXHAUSTED.")
    threads: int = Field(2, ge=1, description="llama_cpp: threads per slot.")
    price_per_1k_tokens: float = Field(0.002, ge=0, description="Cloud price per 1,000 tokens (prompt + completion), for the cost ledger.")
    openai_base_url: str | None = Field(None, description="openai: base URL of the OpenAI-compatible API (None: api.openai.com).")
    openai_api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest a single generation may take.")
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict, description="vllm: extra AsyncEngineArgs (e.g. dtype, max_model_len).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings, description="Replica autoscaling.")
