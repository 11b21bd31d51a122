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
            prompt = self._prompt(messages, True)
            with self._lock:
                out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                                 stop=list(stop) or None, seed=0)
            return out["choices"][0]["text"] or ""
        with self._lock:
            out = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                  top_k=1, stop=list(stop) or None, seed=0)
        return out["choices"][0]["message"]["content"] or ""

    def _prompt(self, messages: list[dict[str, Any]], continue_final_message: bool) -> str:
        """``messages`` rendered as the edge worker renders a step's prompt (the GGUF's chat template)."""
        if self._render is None:
            from edge_node.worker import chat_renderer

            self._render = chat_renderer(self.llm)
            if self._render is None:
                from hera_ray.errors import ConfigError

                raise ConfigError(f"{self.base} has no chat template: a step's prompt needs one")
        return self._render(tuple((m["role"], m["content"]) for m in messages), continue_final_message)

    def generate_step(self, messages: list[dict[str, Any]], max_tokens: int = 64,
                      continue_final_message: bool = False) -> tuple[str, list[float]]:
        """The greedy next line, as an edge worker writes a step: (its text up to the line end, each
        token's log-probability, the line-end token's included, as the edge reports them)."""
        import llama_cpp
        import numpy as np

        from edge_node.worker import _logprob

        prompt = self._prompt(messages, continue_final_message)
        with self._lock:
            llm = self.llm
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            vocab, n_vocab = llm._model.vocab, llm.n_vocab()
            completion: list[int] = []
            logprobs: list[float] = []
            for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                completion.append(token)
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                logprobs.append(_logprob(row, token)[0])
                if b"\n" in llm.detokenize([token], prev_tokens=ids + completion[:-1]) or len(completion) >= max_tokens:
                    break
            text = llm.detokenize(completion, prev_tokens=ids).decode("utf-8", errors="replace")
        return text.split("\n", 1)[0], logprobs

    def score(self, messages: list[dict[str, Any]], text: str, continue_final_message: bool = False) -> list[float]:
        """The model's token log-probabilities of ``text`` as its reply to ``messages`` (continuing the
        last message with ``continue_final_message``), in the edge worker's prompt: one prefill."""
        from edge_node.worker import score_candidate

        prompt = self._prompt(messages, continue_final_message)
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
