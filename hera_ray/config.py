"""Configuration models: one pydantic-settings class per component.

Every field has a description; the CLI builds its flags from these (``hera_ray.cli``), so a
setting is declared once. Values come, highest first, from CLI flags, ``HERA_*`` environment
variables, a YAML file (``--config``), then the defaults, which run on a laptop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hera_ray.errors import ConfigError
from hera_ray.pricing import DEFAULT_CLOUD_PRICES, FREE, PriceSheet
from hera_ray.tls import TLSFiles

MiB = 1024 * 1024

_FLAT_ALIAS_HELP = ("Deprecated alias: one flat USD price per 1,000 tokens of any kind, the same as {sheet} at 1,000 "
                    "times it; setting it and {sheet} to different prices is an error.")


def _prices_with_flat_alias(flat: float | None, sheet: PriceSheet, sheet_given: bool, sheet_names: str) -> PriceSheet:
    """The prices a config means: its sheet, or the sheet the deprecated ``price_per_1k_tokens`` stands for."""
    if flat is None:
        return sheet
    alias = PriceSheet.flat(flat)
    if sheet_given and sheet != alias:
        raise ValueError(f"price_per_1k_tokens ({flat:g}, a deprecated alias for {sheet_names} all at {alias.input_per_mtok:g} "
                         f"per million) disagrees with {sheet_names} ({sheet.input_per_mtok:g}, {sheet.cached_input_per_mtok:g}, "
                         f"{sheet.output_per_mtok:g}): set only one of them")
    return alias


class EdgeNodeConfig(BaseSettings):
    """An edge node: a llama.cpp SLM served over gRPC (``hera edge serve``)."""

    model_config = SettingsConfigDict(env_prefix="HERA_EDGE_", extra="forbid")

    model: str = Field("qwen2.5-coder-0.5b", description="Bundled model name (qwen2.5-coder-0.5b, smollm2-135m, qwen2.5-coder-1.5b) or path to a GGUF file.")
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
    threads: int = Field(1, ge=1, le=256, description="llama.cpp threads per slot. One is as fast as two for a small SLM on a small box (Qwen2.5-Coder-0.5B here: 29 tok/s on 1 thread, 27 on 2; SmolLM2-135M: 132 on 1, 44 on 2), and leaves the other core to the rest; raise it for larger models.")
    input_price_per_mtok: float = Field(FREE.input_per_mtok, ge=0, allow_inf_nan=False, description="USD this node charges per million prompt tokens not found in its prompt cache, for the cost ledger.")
    cached_input_price_per_mtok: float = Field(FREE.cached_input_per_mtok, ge=0, allow_inf_nan=False, description="USD this node charges per million prompt tokens found in its prompt cache (at most --input-price-per-mtok).")
    output_price_per_mtok: float = Field(FREE.output_per_mtok, ge=0, allow_inf_nan=False, description="USD this node charges per million completion tokens.")
    price_per_1k_tokens: float | None = Field(None, ge=0, allow_inf_nan=False, description=_FLAT_ALIAS_HELP.format(sheet="the three *_price_per_mtok"))
    drain_timeout_s: float = Field(120.0, gt=0, description="On SIGTERM, how long to wait for accepted work to finish before stopping.")
    max_message_bytes: int = Field(4 * MiB, ge=1024, description="Largest gRPC message the server accepts or sends.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve EdgeWorker over TLS (with --tls-key-file), and present it to an mTLS registry.")
    tls_key_file: Path | None = Field(None, description="PEM private key of --tls-cert-file.")
    tls_ca_file: Path | None = Field(None, description="PEM CA: dial the registry over TLS and verify it with this CA; with --tls-client-auth, the CA client certificates must be signed by.")
    tls_client_auth: bool = Field(False, description="Require callers to present a certificate signed by --tls-ca-file (mutual TLS).")
    generation_cache: Path | None = Field(None, description="SQLite file of temperature-0 results by (model file, request), shared by this machine's engines: an evaluation setting, so that benchmark policies reaching the same step share it (hera_ray/gencache.py). Hits take no engine time, so latency measured with it is not the engine's. Off by default.")

    @model_validator(mode="after")
    def _check_prices(self) -> "EdgeNodeConfig":
        # Flat fields, not a nested PriceSheet: the CLI makes one flag per field.
        if self.cached_input_price_per_mtok > self.input_price_per_mtok:
            raise ValueError(f"cached_input_price_per_mtok ({self.cached_input_price_per_mtok:g}) may not exceed "
                             f"input_price_per_mtok ({self.input_price_per_mtok:g})")
        given = bool({"input_price_per_mtok", "cached_input_price_per_mtok", "output_price_per_mtok"} & self.model_fields_set)
        prices = _prices_with_flat_alias(self.price_per_1k_tokens, self.prices, given,
                                         "input_price_per_mtok, cached_input_price_per_mtok and output_price_per_mtok")
        self.input_price_per_mtok = prices.input_per_mtok
        self.cached_input_price_per_mtok = prices.cached_input_per_mtok
        self.output_price_per_mtok = prices.output_per_mtok
        return self

    @property
    def prices(self) -> PriceSheet:
        """What this node charges, as the sheet it registers with."""
        return PriceSheet(input_per_mtok=self.input_price_per_mtok, cached_input_per_mtok=self.cached_input_price_per_mtok,
                          output_per_mtok=self.output_price_per_mtok)

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(cert_file=self.tls_cert_file, key_file=self.tls_key_file, ca_file=self.tls_ca_file,
                        client_auth=self.tls_client_auth)


class RegistryConfig(BaseSettings):
    """The EdgeRegistry gRPC server that edge nodes register with (``hera registry serve``)."""

    model_config = SettingsConfigDict(env_prefix="HERA_REGISTRY_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind the registry's gRPC server to (0.0.0.0 for all interfaces).")
    port: int = Field(50051, ge=0, le=65535, description="Port of the registry's gRPC server.")
    token_file: Path | None = Field(None, description="File of accepted node tokens, one per line ('#' starts a comment). Required.")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60, description="How often nodes are told to heartbeat, in seconds.")
    missed_heartbeats: int = Field(3, ge=1, le=100, description="Heartbeats a node may miss before it is marked down.")
    max_message_bytes: int = Field(4 * MiB, ge=1024, description="Largest gRPC message the server accepts or sends.")
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve the registry over TLS (with --tls-key-file).")
    tls_key_file: Path | None = Field(None, description="PEM private key of --tls-cert-file.")
    tls_ca_file: Path | None = Field(None, description="PEM CA that client certificates must be signed by (with --tls-client-auth).")
    tls_client_auth: bool = Field(False, description="Require edge nodes and clients to present a certificate signed by --tls-ca-file (mutual TLS).")

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(cert_file=self.tls_cert_file, key_file=self.tls_key_file, ca_file=self.tls_ca_file,
                        client_auth=self.tls_client_auth)


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
    prices: PriceSheet = Field(DEFAULT_CLOUD_PRICES, description="What the cloud LLM costs, in USD per million input, cached input and output tokens, for the cost ledger and budgets; default: gpt-4o-mini's list price.")
    price_per_1k_tokens: float | None = Field(None, ge=0, allow_inf_nan=False, description=_FLAT_ALIAS_HELP.format(sheet="prices"))
    openai_base_url: str | None = Field(None, description="openai: base URL of the OpenAI-compatible API (None: api.openai.com).")
    openai_api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    openai_continue_final_message: bool = Field(False, description="openai: the endpoint continues an open assistant message when asked with continue_final_message (a vLLM or SGLang server does; OpenAI's own API does not). Off, the agent asks for each step in the documented fallback format (steps as an assistant turn, then a user turn asking for the next step), and the trace says step_format \"turns\".")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest a single generation may take.")
    generation_cache: Path | None = Field(None, description="llama_cpp: SQLite file of temperature-0 results by (model file, request), shared by this machine's engines; `hera up` gives it to the edges it starts too. An evaluation setting, so that benchmark policies reaching the same step share it (hera_ray/gencache.py); hits take no engine time, so latency measured with it is not the engine's. Off by default.")
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict, description="vllm: extra AsyncEngineArgs (e.g. dtype, max_model_len).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each replica needs, e.g. {\"cloud\": 1} to keep replicas on the nodes started with `ray start --resources '{\"cloud\": 4}'`.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings, description="Replica autoscaling.")

    @model_validator(mode="after")
    def _flat_price_alias(self) -> "CloudLLMConfig":
        self.prices = _prices_with_flat_alias(self.price_per_1k_tokens, self.prices, "prices" in self.model_fields_set, "prices")
        return self

    @model_validator(mode="after")
    def _cache_needs_llama_cpp(self) -> "CloudLLMConfig":
        if self.generation_cache is not None and self.backend != "llama_cpp":
            raise ValueError(f"cloud.generation_cache works with the llama_cpp backend only, not {self.backend}")
        return self


class SchedulerConfig(BaseModel):
    """The SubtaskScheduler actor and the EdgeRegistry it runs."""

    model_config = ConfigDict(extra="forbid")

    registry_host: str = Field("127.0.0.1", description="Address the EdgeRegistry binds (0.0.0.0 to let edge boxes on other hosts in).")
    registry_port: int = Field(50051, ge=0, le=65535, description="Port of the EdgeRegistry.")
    registry_advertise_host: str | None = Field(None, description="Host or IP edge boxes dial the registry at, as `hera up` reports it; default: registry_host, or the head node's IP when registry_host is 0.0.0.0 / ::.")
    token_file: Path | None = Field(None, description="Accepted edge tokens, one per line; default: ~/.cache/hera-ray/cluster/token, created if missing.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="How often edge nodes heartbeat.")
    missed_heartbeats: int = Field(3, ge=1, description="Heartbeats a node may miss before it is marked down.")
    edge_model: str = Field("qwen2.5-coder-0.5b", description="Model id of the edge SLM that policies place subtasks on.")
    max_cloud_cost_per_request: float | None = Field(None, ge=0, description="Cap on one request's cloud spend, in USD; past it, cloud subtasks fall back to the edge (or the request stops if none is up).")
    random_slm_share: float = Field(0.5, ge=0, le=1, description="Share of subtasks the random policy sends to the edge.")
    cascade_threshold: float = Field(0.9, ge=0, le=1.01, description="cascade: the SLM's answer stands when its chain's geometric-mean token probability is at least this; else the LLM answers again (0: never; above 1: always).")
    seed: int = Field(0, description="Seed of the random policy.")
    tls: TLSFiles = Field(default_factory=TLSFiles, description="TLS of the EdgeRegistry (served with cert_file/key_file; client_auth: mTLS) and of the channels to edge nodes (TLS when ca_file is set, presenting cert_file for mTLS).")


class StoreSettings(BaseModel):
    """The durable store of the ledger, the API keys' spend and run traces (:mod:`hera_ray.store`)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="SQLAlchemy URL of the store. Default: SQLite on the head, <cache folder>/store.sqlite (~/.cache/hera-ray or $HERA_CACHE_DIR). For a cluster: PostgreSQL, postgresql+psycopg://user:password@host:5432/db.")
    connect_timeout_s: float = Field(10.0, gt=0, description="How long `hera up` waits to reach the store before it fails with an error naming it.")
    batch_max: int = Field(512, ge=1, description="Rows the writer commits in one transaction at most (it commits whatever has queued, up to this).")
    retry_max_s: float = Field(5.0, gt=0, description="Longest wait between retries of a failed write (the wait doubles from 50 ms); writes are retried until the store takes them.")
    ack_timeout_s: float = Field(2.0, gt=0, description="How long a step's report or charge waits for its row to be committed before it goes on (the row stays queued and is retried): normally a commit takes milliseconds; this bounds what an unreachable store costs the agent.")


class AgentConfig(BaseModel):
    """The agent loop: how a request becomes a chain of subtasks."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(100, ge=1, le=100, description="Steps per request at most (a step is one line of the chain of thought; hera_ray/agent/steps.py); then the answer is read from the chain so far. The chain's token cap (max_chain_tokens) usually ends a chain first, as max_tokens ends one turn.")
    max_steps_limit: int = Field(100, ge=1, le=100, description="Largest max_steps a request may ask for (its own cap on steps); the ingress answers 400 past it.")
    max_tokens_per_step: int = Field(256, ge=8, le=4096, description="Tokens a model may write in one step; a step cut here goes on in the next step from where it stopped.")
    max_chain_tokens: int = Field(1024, ge=16, le=32_768, description="Tokens the whole chain of thought may hold (the sum of its steps' completions), like one turn's max_tokens; then the answer is read from the chain so far.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature of every step.")
    step_max_tokens: int = Field(512, ge=1, le=32_768, description="Step mode (model step:<policy>): tokens a call's reply may hold when the request gives no max_tokens.")
    step_max_tokens_limit: int = Field(4096, ge=1, le=32_768, description="Step mode: the largest max_tokens a call may ask for; the ingress answers 400 past it.")
    edge_retries: int = Field(2, ge=0, le=10, description="Times a failed edge subtask (node died, froze, drains or is full) is re-routed before it fails the request.")
    edge_timeout_s: float = Field(60.0, gt=0, description="Longest one edge subtask may take, queueing included; past it the node is taken as frozen and the subtask is re-routed.")
    cloud_retries: int = Field(3, ge=0, le=10, description="Times a cloud subtask whose replica died or was full is tried again (Serve replaces dead replicas) before it fails the request.")
    retry_backoff_s: float = Field(0.5, ge=0, le=30, description="Wait before the first cloud retry; doubled on each further one (at most 10 s).")


class IngressConfig(BaseModel):
    """The HTTP ingress (OpenAI-compatible API)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP ingress listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP ingress.")
    api_key_env: str = Field("HERA_API_KEY", description="Environment variable holding a bearer API key (named \"default\", no limits); with it and api_keys_file both unset, no key is required.")
    api_keys_file: Path | None = Field(None, description="YAML list of API keys ({name, key, requests_per_minute, burst, cloud_budget in USD}), read by each ingress replica; accepted alongside the api_key_env key. A key's cloud spend is kept by the scheduler actor, so its budget holds across replicas; its rate bucket lives per ingress replica, so N replicas let it through up to N times its rate.")
    max_concurrent_runs: int = Field(8, ge=1, description="Agent runs (streams included, until they end) one ingress replica works on at once; past it a run gets 429 with Retry-After (about when a slot frees) at once instead of queueing. 8 keeps a run's latency bounded on a 2-core box with the bundled models (32 runs admitted at once took up to 15 min there); raise it with the cluster's capacity.")
    max_body_bytes: int = Field(1 * MiB, ge=1024, description="Largest request body accepted (413 past it).")
    max_ongoing_requests: int = Field(256, ge=2, description="Requests of any kind one ingress replica takes at once (Serve queues the rest); above max_concurrent_runs, so runs get hera's 429 first and health checks and /v1/models still get in while runs fill their slots.")

    @model_validator(mode="after")
    def _room_beside_runs(self) -> "IngressConfig":
        if self.max_ongoing_requests <= self.max_concurrent_runs:
            raise ValueError(f"ingress.max_ongoing_requests ({self.max_ongoing_requests}) must exceed ingress.max_concurrent_runs "
                             f"({self.max_concurrent_runs}), or Serve queues runs before hera can refuse them and health checks wait behind them")
        return self


class HeraPolicySettings(BaseModel):
    """The HERA policy and its estimators (Serve deployments); also the HybridLLM baseline's router."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Deploy the estimators and offer the hera, hera-no-*, hybridllm and routellm policies.")
    estimators: Path | None = Field(None, description="Folder of trained estimators (`hera train --out`); default: the set bundled with hera-ray.")
    threshold_base: float = Field(0.6, ge=-1, le=1, description="Base of the position-aware similarity threshold: κ_i = base + min(i, 5) · kappa_step.")
    kappa_step: float = Field(0.02, ge=0, le=1, description="How much κ rises per subtask position (up to position 5).")
    tau_req: float = Field(0.78, ge=0, le=1, description="URC: a request with P(simple) at least this runs wholly on the SLM (0.78: the paper's operating point).")
    tau_hybrid: float = Field(0.78, ge=0, le=1, description="hybridllm: a request with P(simple) at least this runs wholly on the SLM, else wholly on the LLM.")
    routellm_threshold: float = Field(0.5, ge=0, le=1.01, description="routellm: a request with P(the LLM wins) at least this runs wholly on the LLM, else wholly on the SLM (RouteLLM's threshold; above 1: never the LLM).")
    use_urc: bool = Field(True, description="Stage URC on (off: --no-urc ablation).")
    use_cd: bool = Field(True, description="Stage SLE/CD on (off: --no-cd ablation).")
    use_sd: bool = Field(True, description="Stage SD on (off: --no-sd ablation).")
    max_distance: int = Field(3, ge=0, le=10, description="CD: largest predicted distance rolled forward.")
    replicas: int = Field(1, ge=1, description="Replicas of the estimator deployment.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves per estimator replica.")
    threads: int = Field(1, ge=1, description="llama.cpp threads per generative estimator (SP_SLM, SP_LLM, SD).")


class VerifySettings(BaseModel):
    """The step-verifying policy ``hera-verify`` (:mod:`hera_ray.policy.verify`): the SLM writes each
    step; its confidence or a trained classifier keeps it; the LLM scores the rest and rewrites
    what it rejects."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Offer the hera-verify policy.")
    classifier: Path | None = Field(None, description="Step classifier (JSON, `hera train`'s verifier.json); default: the one in hera.estimators' folder (the bundled set's), else none (the SLM's confidence alone).")
    keep: float = Field(0.95, ge=0, le=1, description="The knob: P(good) at which the SLM's step is kept without the LLM (`hera-verify@<keep>`). 0.95: chosen from the dev-split sweeps of GSM8K and MBPP (bench/results/dev14, dev14b), confirmed in dev14e and dev14g.")
    confidence_keep: float = Field(0.97, ge=0, le=1.01, description="SLM geometric-mean token probability at which a step is kept outright (above 1: never).")
    llm_accept: float | None = Field(None, ge=0, le=1, description="LLM step score (geometric mean of p(token)/p(top token)) at which the LLM keeps the SLM's step; below it the LLM rewrites the step. Default: the knob, keep (one bar for both kinds of evidence).")
    reject_below: float = Field(0.0, ge=0, le=1, description="P(good) under which the LLM rewrites the step without scoring it first (0: always score first).")
    batch_above: float = Field(0.0, ge=0, le=1, description="P(good) under which a borderline step closes its batch of checks (checked at once with the steps waiting before it): the LLM is likely to reject it, and the SLM steps written after a rejected step are discarded. 0: every borderline step may wait.")
    check_writes: bool = Field(True, description="The LLM's check writes in place of the step it rejects, in the same call: one read of the prompt for the check and the rewrite (llama.cpp: over one KV cache; vLLM: a second request over its prefix cache). Off: the rewrite is a second call, which reads the prompt again (billed as cached input).")
    check_batch: int = Field(3, ge=1, le=16, description="Borderline steps the LLM scores in one prefill at most: the SLM writes on while up to this many wait for their check (1: each step is checked before the next is written; 3, the default, was calibrated with keep). The same per-step decisions; fewer prompt re-reads on the cloud; a rejection discards the SLM steps written after it.")


class HeraConfig(BaseSettings):
    """The whole cluster side: what ``hera up`` and the Serve builder read."""

    model_config = SettingsConfigDict(env_prefix="HERA_", env_nested_delimiter="__", extra="forbid")

    app_name: str = Field("hera", description="Name of the Serve application.")
    namespace: str = Field("hera", description="Ray namespace of the scheduler actor.")
    cloud: CloudLLMConfig = Field(default_factory=CloudLLMConfig, description="The cloud LLM deployment.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="The scheduler actor and edge registry.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="The agent loop.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The HTTP ingress.")
    hera: HeraPolicySettings = Field(default_factory=HeraPolicySettings, description="The HERA policy and its estimators.")
    verify: VerifySettings = Field(default_factory=VerifySettings, description="The step-verifying policy hera-verify.")
    store: StoreSettings = Field(default_factory=StoreSettings, description="The durable store: ledger, API keys' spend, run traces.")


def default_config_file() -> Path:
    """The settings file ``hera up`` reads when no ``--config`` is given (and ``hera calibrate``
    writes): ``$HERA_CONFIG_FILE``, else ``$XDG_CONFIG_HOME/hera-ray/config.yaml``."""
    import os

    if os.environ.get("HERA_CONFIG_FILE"):
        return Path(os.environ["HERA_CONFIG_FILE"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "hera-ray" / "config.yaml"


def default_token_file() -> Path:
    """The local cluster's edge token, created on first use."""
    from hera_ray.models import cache_dir

    path = cache_dir() / "cluster" / "token"
    return path if path.exists() else write_token_file(path)


def write_token_file(path: Path) -> Path:
    """Write a new random token to ``path`` (mode 600)."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# hera-ray edge token\n{secrets.token_urlsafe(32)}\n")
    path.chmod(0o600)
    return path
