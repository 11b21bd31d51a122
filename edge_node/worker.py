"""The edge worker: llama.cpp slots behind a bounded queue, independent of the transport.

``EdgeWorker.generate`` validates a request, waits for a free slot (or refuses with
:class:`~hera_ray.errors.Overloaded` when the queue is full), and runs llama.cpp in a thread so
the event loop stays free. One :class:`LlamaSlot` per slot: a llama.cpp context decodes one
sequence at a time, and keeping a context per slot lets a slot reuse its KV cache for a
prompt that extends the previous one (an agent's growing context).

Imports neither Ray nor torch; llama_cpp is imported when a slot is created.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from hera_ray.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, Overloaded, Unavailable
from hera_ray.generation import (LINE_END, GenerationParams, GenerationResult, candidate_segments, rejects,
                                 validate_params)
from hera_ray.gencache import GenerationCache
from hera_ray.scheduler.nodes import NodeLoad

# OpenMP threads spin between tokens by default, which makes decode speed erratic on small
# machines (MODELS.md); passive waiting must be set before llama.cpp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EWMA_ALPHA = 0.3
# The reply echoes request_id: a longer one could push the reply past the message size limit
# after the work is done (the agent's ids are at most ~210 characters).
MAX_REQUEST_ID_CHARS = 1024


def _valid_utf8_prefix(data: bytes) -> str:
    """Decode ``data``, holding back a trailing incomplete multi-byte character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":
            return data[: e.start].decode("utf-8", errors="replace")
        return data.decode("utf-8", errors="replace")


def _logprob(logits, token: int) -> tuple[float, float]:
    """(log-probability of ``token``, of the most likely token) under one row of logits."""
    import numpy as np

    top = float(logits.max())
    lse = top + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))
    return float(logits[token]) - lse, top - lse


def score_candidate(llm: Any, prompt_tokens: list[int], candidate_tokens: list[int]) -> tuple[list[float], list[float], float]:
    """One prefill of ``candidate_tokens`` after ``prompt_tokens`` in ``llm`` (a ``llama_cpp.Llama``),
    over its KV cache's common prefix; returns (each candidate token's log-probability, the most
    likely token's at each position, seconds). The candidate stays in the cache, so a later prompt
    that extends it (or the prompt alone) reuses it. The caller holds the model's lock."""
    import numpy as np

    t0 = time.perf_counter()
    tokens = list(prompt_tokens) + list(candidate_tokens)
    if len(tokens) > llm.n_ctx():
        raise ContextLengthExceeded(f"the prompt and candidate are {len(tokens)} tokens: over the context window "
                                    f"of {llm.n_ctx()} tokens")
    n_prompt, n_vocab = len(prompt_tokens), llm.n_vocab()
    cached = llm.input_ids[: llm.n_tokens]
    k = min(len(cached), len(tokens))
    differ = np.nonzero(cached[:k] != np.asarray(tokens[:k]))[0]
    common = int(differ[0]) if len(differ) else k
    # The last prompt token is decoded again: its logits score the candidate's first token.
    keep = min(common, n_prompt - 1)
    llm._requires_eval = True  # until the scoring decode finishes, the logits are not this prompt's
    if not llm._ctx.kv_cache_seq_rm(-1, keep, -1):  # partial removal unsupported: start from scratch
        llm.reset()
        keep = 0
    llm.n_tokens = keep
    if n_prompt - 1 > keep:
        llm.eval(tokens[keep: n_prompt - 1])  # the new part of the prefix: no logits needed
    tail = tokens[n_prompt - 1:]
    logprobs: list[float] = []
    tops: list[float] = []
    for i in range(0, len(tail), llm.n_batch):
        batch = tail[i: i + llm.n_batch]
        n_past = llm.n_tokens
        llm._batch.set_batch(batch=batch, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), n_vocab))
        for j in range(len(batch)):
            at = i + j + 1  # the row at tail[i + j] predicts tail[i + j + 1]
            if at < len(tail):
                lp, top = _logprob(rows[j], tail[at])
                logprobs.append(lp)
                tops.append(top)
        llm.input_ids[n_past: n_past + len(batch)] = batch
        llm.n_tokens += len(batch)
    llm._requires_eval = False
    return logprobs, tops, time.perf_counter() - t0


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might start a stop string, and so must not be sent yet."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-k:]):
                longest = k
                break
    return longest


def chat_renderer(llm):
    """``render(messages, continue_final_message=False, tools=None) -> prompt text`` with the GGUF's
    chat template (None if it has none). ``messages`` are (role, content) pairs or OpenAI-style
    message objects (with ``tool_calls``, ``tool_call_id``); ``tools`` go to the template as Hugging
    Face's ``apply_chat_template(tools=...)`` passes them."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text_of(token_id: int) -> str:
        return llm._model.token_get_text(token_id) if token_id != -1 else ""

    formatter = Jinja2ChatFormatter(template=template, eos_token=text_of(llm.token_eos()), bos_token=text_of(llm.token_bos()))

    def objects(messages) -> list[dict]:
        return [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]

    def render(messages, continue_final_message: bool = False, tools=None) -> str:
        messages = objects(messages)
        if continue_final_message:
            # The template up to the assistant's header (add_generation_prompt), then the open
            # message's content: what Hugging Face's continue_final_message renders, without
            # depending on where a template puts its end-of-turn marker.
            head = formatter(messages=messages[:-1], tools=tools or None).prompt
            return head + (messages[-1].get("content") or "")
        return formatter(messages=messages, tools=tools or None).prompt

    return render


class LlamaSlot:
    """One llama.cpp context. Not thread-safe: the worker hands it to one thread at a time."""

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=min(512, n_ctx),
            verbose=False,
        )
        self.n_ctx = self.llm.n_ctx()
        self._line_end_ids: frozenset[int] | None = None
        self.line_end_ids  # found at load, so that no step pays for it

    @property
    def line_end_ids(self) -> frozenset[int]:
        """Ids of the vocabulary's tokens whose text holds a newline (found once, ~0.1 s for 150k tokens)."""
        if self._line_end_ids is None:
            llm = self.llm
            self._line_end_ids = frozenset(
                t for t in range(llm.n_vocab()) if b"\n" in llm.detokenize([t], special=False))
        return self._line_end_ids

    def run(
        self,
        prompt_tokens: list[int],
        p: GenerationParams,
        on_delta: Callable[[str], None] | None,
        cancelled: threading.Event,
    ) -> tuple[str, int, float, float, str, str, list[float] | None]:
        """Decode; return (text, completion tokens, ttft_s, decode_s, finish_reason, stop_reason,
        the tokens' log-probabilities if ``p.logprobs``)."""
        import llama_cpp
        import numpy as np

        llm = self.llm
        if p.seed is not None:
            llm.set_seed(p.seed)
        vocab = llm._model.vocab
        stops = p.stop
        line_ends = self.line_end_ids if p.stop_at_line_end else frozenset()
        # With tools, a template's tool-call markers (Qwen2.5's <tool_call>, a special token) stay in
        # the text, where the caller parses the calls from.
        special = bool(p.tools)
        completion: list[int] = []
        logprobs: list[float] | None = [] if p.logprobs else None
        n_vocab = llm.n_vocab()
        sent = 0  # characters of text already passed to on_delta
        text = ""
        finish = "length"
        stop_reason = ""  # the stop string that ended generation
        hit_stop_string = False
        t0 = time.perf_counter()
        t_first = t_last = None
        for token in llm.generate(
            prompt_tokens,
            temp=p.temperature,
            top_p=1.0 if p.top_p is None else p.top_p,
            top_k=40 if p.top_k is None else p.top_k,
            min_p=0.0 if p.temperature == 0 else 0.05,
            repeat_penalty=1.0,
        ):
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            completion.append(token)
            if logprobs is not None:  # the row the token was sampled from (the model's own distribution)
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                logprobs.append(_logprob(row, token)[0])
            if token in line_ends:  # the step's line ends with this token, which it keeps
                finish, stop_reason = "stop", LINE_END
                break  # the text is decoded once, below
            text = _valid_utf8_prefix(llm.detokenize(completion, prev_tokens=prompt_tokens, special=special))
            if stops:
                hits = [(i, s) for s in stops if (i := text.find(s, max(0, sent - len(s)))) >= 0]
                if hits:
                    at, stop_reason = min(hits)
                    text = text[:at]
                    finish, hit_stop_string = "stop", True
                    break
            if on_delta is not None:
                ready = len(text) - (_stop_holdback(text, stops) if stops else 0)
                if ready > sent:
                    on_delta(text[sent:ready])
                    sent = ready
            if len(completion) >= p.max_tokens or cancelled.is_set():
                break
        if not hit_stop_string:  # flush a held-back partial character or stop-string prefix
            text = llm.detokenize(completion, prev_tokens=prompt_tokens, special=special).decode("utf-8", errors="replace")
        if on_delta is not None and len(text) > sent:
            on_delta(text[sent:])
        if t_first is None:
            return text, 0, 0.0, 0.0, finish, stop_reason, logprobs
        return text, len(completion), t_first - t0, t_last - t_first, finish, stop_reason, logprobs

    def score(self, prompt_tokens: list[int], candidate_tokens: list[int]) -> tuple[list[float], list[float], float]:
        """One prefill of ``candidate_tokens`` after ``prompt_tokens``, over the KV cache's common
        prefix (:func:`score_candidate`); returns (each candidate token's log-probability, the most
        likely token's at each position, seconds). The candidate stays in the cache, so a later
        prompt that extends it (or the prompt alone) reuses it."""
        return score_candidate(self.llm, prompt_tokens, candidate_tokens)

    def check_and_write(self, tokens: list[int], split: int, counts: list[int], starts: list[list[int]],
                        p: GenerationParams, on_delta: Callable[[str], None] | None, cancelled: threading.Event):
        """Read the candidate (``tokens[split:]``, ``counts`` tokens per segment) after the prompt,
        a segment at a time over the KV cache the one before left; at the first under its bar
        (``p.rewrite_below``) stop reading, and write from where it began: after ``starts[k]``, the
        tokens of the prompt and the segments before it as the step's own call would send them
        (generation reuses the common prefix in the KV cache and decodes the rest). The segments
        after it are never read: a rejection early in a long candidate costs what was read. Returns
        (log-probabilities, top log-probabilities, scoring seconds, the segment rewritten or None,
        the tokens read, :meth:`run`'s tuple or None)."""
        logprobs: list[float] = []
        tops: list[float] = []
        seconds, start = 0.0, split
        for k, n in enumerate(counts):
            lps, tps, s = self.score(tokens[:start], tokens[start:start + n])
            logprobs += lps
            tops += tps
            seconds += s
            if rejects(p, k, lps, tps):
                prefix = list(starts[k])
                # Up to the context window: a write cut short there ends "length" (the caller's own
                # call for the step gets the window's error).
                p = replace(p, max_tokens=max(1, min(p.max_tokens, self.n_ctx - len(prefix))))
                return logprobs, tops, seconds, k, start + n, self.run(prefix, p, on_delta, cancelled)
            start += n
        return logprobs, tops, seconds, None, len(tokens), None


@dataclass
class _Stats:
    completed: int = 0
    tokens_generated: int = 0
    tokens_per_s: float = 0.0


class EdgeWorker:
    """Validates requests and runs them on a fixed set of llama.cpp slots behind a bounded queue.

    >>> worker = EdgeWorker(resolve_model("smollm2-135m").path, "smollm2-135m")  # doctest: +SKIP
    >>> (await worker.generate(GenerationParams(prompt="Hi", max_tokens=8))).text  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        n_ctx: int = 2048,
        slots: int = 1,
        max_queue: int = 8,
        threads: int = 1,
        generation_cache: Path | None = None,
    ):
        self.model_id = model_id
        self.slots = [LlamaSlot(model_path, n_ctx, threads) for _ in range(slots)]
        self.n_ctx = self.slots[0].n_ctx
        self.max_queue = max_queue
        llm = self.slots[0].llm
        self._tokenize = llm.tokenize
        self._chat_format = self._make_chat_formatter(llm)
        self._gen_pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llama-slot")
        # Tokenising only reads the vocabulary; it runs apart so validation never waits for a slot.
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-tokenize")
        self._free: asyncio.Queue[LlamaSlot] | None = None
        self._in_flight = 0
        self._queued = 0
        self._stats = _Stats()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        #: Temperature-0 results by (model file, n_ctx, request): an evaluation setting (hera_ray.gencache).
        self.cache = GenerationCache(generation_cache, model_path) if generation_cache else None

    @staticmethod
    def _make_chat_formatter(llm):
        return chat_renderer(llm)

    # -- load ---------------------------------------------------------------------------------

    def load(self) -> NodeLoad:
        s = self._stats
        return NodeLoad(self._in_flight, self._queued, s.tokens_per_s, s.completed, s.tokens_generated)

    async def wait_idle(self) -> None:
        """Return once nothing is in flight or queued."""
        await self._idle.wait()

    def _update_idle(self) -> None:
        if self._in_flight == 0 and self._queued == 0:
            self._idle.set()
        else:
            self._idle.clear()

    # -- validation ---------------------------------------------------------------------------

    def _prompt_text(self, p: GenerationParams) -> str:
        if p.model and p.model != self.model_id:
            raise ModelNotFound(f"model {p.model!r} is not served by this node; it serves {self.model_id!r}")
        if p.messages or p.chat:
            if self._chat_format is None:
                raise InvalidRequest(f"model {self.model_id!r} has no chat template; send a raw prompt instead")
            if p.chat:
                try:
                    return self._chat_format(p.chat_messages(), p.continue_final_message,
                                             json.loads(p.tools) if p.tools else None)
                except Exception as e:  # noqa: BLE001 - the template refused this conversation: the caller's input
                    raise InvalidRequest(f"the chat template of {self.model_id!r} cannot render this chat: {e}") from None
            return self._chat_format(p.messages, p.continue_final_message)
        return p.prompt

    async def _prepare(self, p: GenerationParams) -> tuple[list[int], list[int]]:
        """The request's tokens (prompt, then any candidate), and how many tokens each of a
        candidate's later segments has (``candidate_splits``; tokenised apart from the rest)."""
        validate_params(p, self.n_ctx)
        if len(p.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id is {len(p.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
        segments = candidate_segments(p)
        text = self._prompt_text(p) + (segments[0] if segments else "")
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(self._tok_pool, lambda: self._tokenize(text.encode("utf-8"), True, True))
        later: list[int] = []
        for segment in segments[1:]:  # each later segment on its own: every token belongs to one step
            ids = await loop.run_in_executor(self._tok_pool,
                                             lambda s=segment: self._tokenize(s.encode("utf-8"), False, True))
            tokens += ids
            later.append(len(ids))
        # A check that may write reads the whole candidate, and writes (capped to the window) after part of it.
        if len(tokens) + (0 if p.rewrite_below else p.max_tokens) > self.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens and max_tokens is {p.max_tokens}: "
                f"{len(tokens) + p.max_tokens} exceeds the context window of {self.n_ctx} tokens"
            )
        return tokens, later

    # -- generation ---------------------------------------------------------------------------

    async def _split_candidate(self, p: GenerationParams, tokens: list[int]) -> tuple[int, list[int]]:
        """Where the candidate's tokens start in ``tokens`` (prompt + candidate, tokenised together,
        as the model reads them): after the longest prefix shared with the prompt's own tokens; and
        the prompt's own tokens (where a check that rewrites its first segment writes from).
        (A candidate in segments: its first segment is tokenised with the prompt, the rest apart.)"""
        text = self._prompt_text(p)
        loop = asyncio.get_running_loop()
        alone = await loop.run_in_executor(self._tok_pool, lambda: self._tokenize(text.encode("utf-8"), True, True))
        n = 0
        for a, b in zip(alone, tokens):
            if a != b:
                break
            n += 1
        if n >= len(tokens) or n == 0:
            raise InvalidRequest("the candidate adds no token to the prompt (or there is no prompt to score it after)")
        return n, alone

    async def generate(self, p: GenerationParams, on_delta: Callable[[str], None] | None = None) -> GenerationResult:
        if self.draining:
            raise Unavailable("this edge node is draining and takes no new work; send to another node")
        tokens, later = await self._prepare(p)
        split, alone = await self._split_candidate(p, tokens) if p.candidate else (0, [])
        if later and len(tokens) - split - sum(later) <= 0:
            raise InvalidRequest("the candidate's first segment adds no token to the prompt")
        starts = [alone]
        if p.rewrite_below and p.candidate_splits:
            # Where a write in place of segment k begins: the prompt and the segments before it,
            # tokenised as one text, as the step's own call would send them (the KV cache the check
            # filled serves their common prefix).
            text, loop = self._prompt_text(p), asyncio.get_running_loop()
            for b in p.candidate_splits:
                starts.append(await loop.run_in_executor(
                    self._tok_pool, lambda b=b: self._tokenize((text + p.candidate[:b]).encode("utf-8"), True, True)))
        if self.cache is None:
            return await self._run(p, tokens, split, on_delta, later, starts)
        import llama_cpp

        engine = {"n_ctx": self.n_ctx, "llama_cpp": llama_cpp.__version__, "split": split}
        if p.rewrite_below:  # a check that writes reads up to the step it rejects, and writes as the step's call
            engine["reads"] = "to-rejection; writes after the prompt text"
        key = self.cache.key(p, engine, tokens)
        # SQLite off the event loop: a slow disk must not stall other requests or the heartbeats.
        if (hit := await asyncio.to_thread(self.cache.get, key, p.request_id) if key else None) is not None:
            if on_delta is not None and hit.text:  # a stream gets the stored text as one delta
                on_delta(hit.text)
            return hit
        result = await self._run(p, tokens, split, on_delta, later, starts)
        return await asyncio.to_thread(self.cache.put, key, result) if key else result

    async def _run(self, p: GenerationParams, tokens: list[int], split: int,
                   on_delta: Callable[[str], None] | None, later: list[int] = (),
                   starts: list[list[int]] = ()) -> GenerationResult:
        if self._in_flight + self._queued >= len(self.slots) + self.max_queue:
            raise Overloaded(
                f"edge node queue is full ({self._in_flight} in flight, {self._queued} queued); retry later or elsewhere"
            )
        if self._free is None:
            self._free = asyncio.Queue()
            for slot in self.slots:
                self._free.put_nowait(slot)
        loop = asyncio.get_running_loop()
        t_queue = time.perf_counter()
        self._queued += 1
        self._update_idle()
        try:
            slot = await self._free.get()
        finally:
            self._queued -= 1
        queue_s = time.perf_counter() - t_queue
        self._in_flight += 1
        cancelled = threading.Event()
        counts = [len(tokens) - split - sum(later), *later]
        if p.candidate and p.rewrite_below:
            fut = loop.run_in_executor(self._gen_pool, slot.check_and_write, tokens, split, counts, starts, p,
                                       on_delta, cancelled)
        elif p.candidate:
            fut = loop.run_in_executor(self._gen_pool, slot.score, tokens[:split], tokens[split:])
        else:
            fut = loop.run_in_executor(self._gen_pool, slot.run, tokens, p, on_delta, cancelled)

        def release(_f) -> None:  # runs on the loop once the thread is done, even if cancelled
            self._in_flight -= 1
            self._free.put_nowait(slot)
            self._update_idle()

        fut.add_done_callback(release)
        try:
            out = await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled.set()  # the client went away: stop decoding at the next token
            raise
        segments = counts if p.candidate_splits else None
        if p.candidate and p.rewrite_below:  # checked, and written where the check failed
            logprobs, tops, seconds, k, read, written = out
            if k is None:
                return GenerationResult("", len(tokens), 0, seconds, 0.0, queue_s, "score", p.request_id,
                                        logprobs=logprobs, top_logprobs=tops, segment_tokens=segments)
            text, n, ttft, decode, finish, stop_reason, _ = written
            self._count(n, decode)
            # Prompt tokens: those read (up to the rejected segment); ttft_s and decode_s are the
            # writing's own (the scoring before it is the check's time).
            return GenerationResult(text, read, n, ttft, decode, queue_s, finish, p.request_id, stop_reason,
                                    logprobs=logprobs, top_logprobs=tops, rewritten_segment=k,
                                    segment_tokens=segments[:k + 1] if segments else None)
        if p.candidate:  # scored, not generated: the candidate's tokens are prompt tokens
            logprobs, tops, seconds = out
            return GenerationResult("", len(tokens), 0, seconds, 0.0, queue_s, "score", p.request_id,
                                    logprobs=logprobs, top_logprobs=tops, segment_tokens=segments)
        text, n, ttft, decode, finish, stop_reason, logprobs = out
        self._count(n, decode)
        return GenerationResult(text, len(tokens), n, ttft, decode, queue_s, finish, p.request_id, stop_reason,
                                logprobs=logprobs)

    def _count(self, n: int, decode: float) -> None:
        """A generation finished: count it, and its decode speed."""
        s = self._stats
        s.completed += 1
        s.tokens_generated += n
        if n > 1 and decode > 0:
            rate = (n - 1) / decode
            s.tokens_per_s = rate if s.tokens_per_s == 0 else EWMA_ALPHA * rate + (1 - EWMA_ALPHA) * s.tokens_per_s

    async def stream(self, p: GenerationParams) -> AsyncIterator[str | GenerationResult]:
        """Yield text deltas as they are decoded, then the GenerationResult."""
        deltas: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self.generate(p, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)))
        try:
            while True:
                getter = asyncio.ensure_future(deltas.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not deltas.empty():  # deltas are posted before the result: drain them first
                    yield deltas.get_nowait()
                yield task.result()
                return
        finally:
            if not task.done():
                task.cancel()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self._gen_pool.shutdown(wait=True, cancel_futures=True)
        self._tok_pool.shutdown(wait=True, cancel_futures=True)
        for slot in self.slots:
            slot.llm.close()
