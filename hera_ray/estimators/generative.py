"""Generative estimators (SP, SD) at serving time: a LoRA adapter on the bundled SLM, in llama.cpp.

The adapters are trained in PyTorch (``hera_ray.offline.causal``) and exported as llama.cpp LoRA
GGUFs; llama.cpp runs them several times faster than transformers on a CPU. This module imports
no torch: ``llama_cpp`` is imported when a generator is built.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from hera_ray.models import resolve_model


class LoraGenerator:
    """Greedy chat completions from a base GGUF with an optional llama.cpp LoRA adapter.

    ``base``: a bundled model name or a path to a GGUF; ``adapter``: an ``adapter.gguf`` written by
    ``export_lora_gguf`` (``None`` = the base model alone). Greedy decoding, because an estimator
    must answer the same context the same way every time.
    """

    def __init__(self, base: str | Path = "smollm2-135m", adapter: Path | None = None, n_threads: int = 1,
                 n_ctx: int = 2048):
        from llama_cpp import Llama  # heavy native library: only when a generator is built

        base_path = Path(base).expanduser()
        if not base_path.is_file():
            base_path = resolve_model(str(base)).path
        if adapter is not None and not Path(adapter).is_file():
            raise FileNotFoundError(f"LoRA adapter {adapter} does not exist")
        self.base = base_path
        self.adapter = Path(adapter) if adapter is not None else None
        self.llm: Any = Llama(model_path=str(base_path), lora_path=str(adapter) if adapter is not None else None,
                              n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        # One llama.cpp context holds one KV cache: concurrent calls would corrupt each other.
        self._lock = threading.Lock()
        self._render = None  # the chat template with continue_final_message, made on first use

    def generate(self, messages: list[dict[str, Any]], max_tokens: int = 64, stop: tuple[str, ...] = (),
                 continue_final_message: bool = False) -> str:
        """The greedy reply to ``messages`` (rendered with the GGUF's chat template); with
        ``continue_final_message`` the last (assistant) message is continued, as the agent's steps are."""
        if continue_final_message:
            if self._render is None:
                from edge_node.worker import chat_renderer

                self._render = chat_renderer(self.llm)
                if self._render is None:
                    from hera_ray.errors import ConfigError

                    raise ConfigError(f"{self.base} has no chat template: SP's chain format needs one (train with --sp-format compact)")
            prompt = self._render(tuple((m["role"], m["content"]) for m in messages), True)
            with self._lock:
                out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                                 stop=list(stop) or None, seed=0)
            return out["choices"][0]["text"] or ""
        with self._lock:
            out = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                  top_k=1, stop=list(stop) or None, seed=0)
        return out["choices"][0]["message"]["content"] or ""

    def score(self, messages: list[dict[str, Any]], text: str, continue_final_message: bool = False) -> list[float]:
        """The model's token log-probabilities of ``text`` as its reply to ``messages`` (continuing the
        last message with ``continue_final_message``): one prefill, greedy or not."""
        from edge_node.worker import chat_renderer, score_candidate

        if not continue_final_message:
            raise ValueError("scoring reads the chain format (continue_final_message): train SP with --sp-format chain")
        if self._render is None:
            self._render = chat_renderer(self.llm)
            if self._render is None:
                from hera_ray.errors import ConfigError

                raise ConfigError(f"{self.base} has no chat template: scoring a step needs one")
        prompt = self._render(tuple((m["role"], m["content"]) for m in messages), True)
        with self._lock:
            ids = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            whole = self.llm.tokenize((prompt + text).encode("utf-8"), add_bos=True, special=True)
            cand = whole[len(ids):] if whole[: len(ids)] == ids else self.llm.tokenize(text.encode("utf-8"), add_bos=False)
            logprobs, _tops, _s = score_candidate(self.llm, ids, cand)
        return logprobs

    def close(self) -> None:
        """Free the llama.cpp model and context now rather than at garbage collection."""
        with self._lock:
            self.llm.close()
