"""A trained estimator set (``hera train``'s output folder) loaded in this process.

The folder holds ``manifest.json`` and one sub-folder per estimator: ``urc/``, ``hybridllm/``,
``dp/`` (peft LoRA adapters on the MiniLM encoder; DP over the SLM's confidence is a logistic
regression instead, ``dp/dp.json``) and ``sp_slm/``, ``sp_llm/``, ``sd/`` (llama.cpp
LoRA adapters, ``adapter.gguf``, on the SLM). :class:`LocalEstimators` implements the policy's
:class:`~hera_ray.estimators.base.EstimatorSet` over them; the Serve deployments in
``hera_ray.serve.estimators`` host the same object on a replica.

A set ships inside the package (``BUNDLED_ESTIMATORS``) so the ``hera`` policy runs out of the box.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from hera_ray.errors import ConfigError
from hera_ray.estimators.base import history_steps
from hera_ray.estimators.prompts import (DP_INPUTS, SD_MAX_TOKENS, SP_MAX_TOKENS, clean_prediction, encoder_context,
                                         parse_parts, sd_messages, sp_request)
from hera_ray.policy.base import SubtaskContext

MANIFEST = "manifest.json"
BUNDLED_ESTIMATORS = Path(__file__).parent / "trained" / "default"
ENCODERS = ("urc", "hybridllm", "routellm", "dp")
#: The class whose probability a request classifier reports: P(simple) of URC and HybridLLM, and
#: RouteLLM's P(the strong model wins).
REQUEST_LABEL = {"urc": "simple", "hybridllm": "simple", "routellm": "strong"}
GENERATORS = ("sp_slm", "sp_llm", "sd")


def estimators_path(path: str | Path | None = None) -> Path:
    """The estimator folder: ``path`` if given, else the bundled set. Checked to hold a manifest."""
    folder = Path(path).expanduser() if path else BUNDLED_ESTIMATORS
    if not (folder / MANIFEST).is_file():
        raise ConfigError(f"no trained estimators at {folder} ({MANIFEST} missing): run `hera train --out {folder}`")
    return folder


def load_manifest(path: str | Path | None = None) -> dict[str, Any]:
    folder = estimators_path(path)
    return json.loads((folder / MANIFEST).read_text())


class LocalEstimators:
    """URC, HybridLLM, DP, SP (both sides), SD and SBERT in this process.

    Blocking model calls run in threads (``asyncio.to_thread``); SP's two sides are separate
    llama.cpp contexts, so the policy can predict both at once.
    """

    #: SP predictions remembered (by prompt) at most.
    MEMO_SIZE = 4096

    def __init__(self, path: str | Path | None = None, n_threads: int = 1, load: Sequence[str] | None = None):
        from hera_ray.estimators.encoders import EncoderClassifier
        from hera_ray.estimators.generative import LoraGenerator
        from hera_ray.estimators.similarity import SbertSimilarity

        self.folder = estimators_path(path)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        entries = self.manifest["estimators"]
        wanted = set(load or entries)
        self.encoders: dict[str, Any] = {}
        self.generators: dict[str, Any] = {}
        self.dp_softmax = None  # DP over the SLM's confidence (a logistic regression, not an encoder)
        for name in ENCODERS:
            if name in entries and name in wanted:
                if entries[name]["kind"] == "logistic":
                    from hera_ray.estimators.logistic import SoftmaxClassifier

                    self.dp_softmax = SoftmaxClassifier.load(self.folder / entries[name]["path"])
                    continue
                self.encoders[name] = EncoderClassifier(self.folder / entries[name]["path"])
        for name in GENERATORS:
            if name in entries and name in wanted:
                adapter = entries[name].get("path")  # None: the base model itself (SP_SLM on the SLM's own weights)
                self.generators[name] = LoraGenerator(entries[name]["base"], self.folder / adapter if adapter else None,
                                                      n_threads=n_threads)
        self.sbert = SbertSimilarity(self.manifest.get("similarity_model", "minilm-l6"))
        self.max_distance = int(self.manifest.get("max_distance", 3))
        self.sp_format = self.manifest.get("sp_format", "compact")
        self._memo: OrderedDict[str, tuple[str, list[float] | None]] = OrderedDict()  # SP prompt -> prediction
        self._memo_lock = threading.Lock()
        self.memo_hits = 0
        self.dp_input = self.manifest.get("dp_input", "context")
        if self.dp_input not in DP_INPUTS:
            raise ConfigError(f"the estimator set at {self.folder} has dp_input {self.dp_input!r}: this hera-ray reads "
                              f"{', '.join(DP_INPUTS)}")

    def _need(self, table: dict[str, Any], name: str) -> Any:
        try:
            return table[name]
        except KeyError:
            raise ConfigError(f"the estimator set at {self.folder} has no {name!r} estimator") from None

    # -- synchronous calls (batched where the model allows) ----------------------------------

    def simple_probs(self, name: str, questions: list[str]) -> list[float]:
        """Per request, the probability of ``name``'s class of interest (:data:`REQUEST_LABEL`): P(simple)
        under URC or the HybridLLM router, P(the strong model wins) under the RouteLLM router."""
        label = REQUEST_LABEL.get(name, "simple")
        return [p.get(label, 0.0) for p in self._need(self.encoders, name).predict_proba(questions)]

    def dp_text(self, question: str, steps: Sequence[tuple[str, str]], slm_next: str | None = None) -> str:
        """DP's input in the form this set was trained on (the SLM's next subtask only if it was)."""
        return encoder_context(question, steps, slm_next if self.dp_input == "context+slm" else None)

    def distances(self, contexts: list[str]) -> list[int | None]:
        out = []
        for label in self._need(self.encoders, "dp").predict(contexts):
            out.append(None if label == "inf" else int(label))
        return out

    def distances_at(self, nodes: Sequence[tuple[str, Sequence[tuple[str, str]], str | None, Sequence[float] | None]]
                     ) -> list[int | None]:
        """DP at each (question, steps so far, the SLM's next subtask, its token log-probabilities) node,
        in the input this set was trained on. A set that reads the SLM's confidence scores a next
        subtask that comes without log-probabilities (SP_SLM's prediction) on SP_SLM's model."""
        if self.dp_softmax is None:
            return self.distances([self.dp_text(q, steps, slm_next) for q, steps, slm_next, _ in nodes])
        from hera_ray.estimators.logistic import dp_features

        out: list[int | None] = []
        for question, steps, slm_next, logprobs in nodes:
            if slm_next is None:
                raise ConfigError(f"the estimator set at {self.folder} reads the SLM's next subtask (dp_input confidence); none was given")
            if logprobs is None:
                logprobs = self.slm_logprobs(question, steps, slm_next)
            label = self.dp_softmax.predict(dp_features(question, steps, slm_next, logprobs))
            out.append(None if label == "inf" else int(label))
        return out

    def slm_logprobs(self, question: str, steps: Sequence[tuple[str, str]], text: str) -> list[float]:
        """The SLM's token log-probabilities of ``text`` as its next step: those SP_SLM wrote it with
        when it is SP_SLM's prediction there (memoized: HERA asked SSE first), else one prefill of
        ``text`` and a line end on SP_SLM's model."""
        predicted, logprobs = self._predict("slm", question, steps)
        if logprobs is not None and predicted == clean_prediction(text):
            return logprobs
        messages, cont = sp_request(self.sp_format, question, list(steps))
        return self._need(self.generators, "sp_slm").score(messages, text.strip() + "\n", continue_final_message=cont)

    def predict_subtask_sync(self, side: str, question: str, steps: list[tuple[str, str]], extra: Sequence[str] = ()) -> str:
        """SP's prediction. Greedy, so the same prompt gives the same prediction: a bounded memo answers
        repeats (CD's roll-forward predicts the SLM's next steps, which SSE asks for again at the next
        subtask when the SLM ran the predicted step; SD asks per part)."""
        return self._predict(side, question, steps, extra)[0]

    def _predict(self, side: str, question: str, steps: Sequence[tuple[str, str]], extra: Sequence[str] = ()
                 ) -> tuple[str, list[float] | None]:
        """SP's prediction and, where DP reads the SLM's confidence, the SLM's token log-probabilities
        of it: SP_SLM in the chain format writes the step as an edge worker does (greedy, to the line
        end), so they are the ones the SLM would write it with."""
        gen = self._need(self.generators, f"sp_{side}")
        messages, cont = sp_request(self.sp_format, question, list(steps), extra)
        key = json.dumps([side, messages, cont])
        with self._memo_lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                self.memo_hits += 1
                return self._memo[key]
        if side == "slm" and self.dp_softmax is not None and self.sp_format == "chain":
            raw, logprobs = gen.generate_step(messages, max_tokens=SP_MAX_TOKENS, continue_final_message=cont)
            out: tuple[str, list[float] | None] = (clean_prediction(raw), logprobs)
        else:
            out = (clean_prediction(gen.generate(messages, max_tokens=SP_MAX_TOKENS, stop=("\n",),
                                                 continue_final_message=cont)), None)
        with self._memo_lock:
            self._memo[key] = out
            while len(self._memo) > self.MEMO_SIZE:
                self._memo.popitem(last=False)
        return out

    def decompose_sync(self, question: str, subtask: str) -> list[str]:
        if "sd" not in self.generators:  # a set trained without SD data: the SD stage finds no parts
            return []
        return parse_parts(self._need(self.generators, "sd").generate(sd_messages(question, subtask), max_tokens=SD_MAX_TOKENS))

    # -- the EstimatorSet interface ---------------------------------------------------------------

    async def request_simple_prob(self, question: str) -> float:
        return (await asyncio.to_thread(self.simple_probs, "urc", [question]))[0]

    async def hybrid_simple_prob(self, question: str) -> float:
        return (await asyncio.to_thread(self.simple_probs, "hybridllm", [question]))[0]

    async def strong_win_prob(self, question: str) -> float:
        return (await asyncio.to_thread(self.simple_probs, "routellm", [question]))[0]

    async def predict_subtask(self, side: str, ctx: SubtaskContext, extra: tuple[str, ...] = ()) -> str:
        return await asyncio.to_thread(self.predict_subtask_sync, side, ctx.question, history_steps(ctx), extra)

    async def distance(self, ctx: SubtaskContext, slm_next: str | None = None,
                       slm_logprobs: Sequence[float] | None = None) -> int | None:
        node = (ctx.question, history_steps(ctx), slm_next, slm_logprobs)
        return (await asyncio.to_thread(self.distances_at, [node]))[0]

    async def decompose(self, subtask: str, ctx: SubtaskContext) -> list[str]:
        return await asyncio.to_thread(self.decompose_sync, ctx.question, subtask)

    async def similarity(self, a: str, b: str) -> float:
        return (await asyncio.to_thread(self.sbert.similarities, [(a, b)]))[0]

    def close(self) -> None:
        for gen in self.generators.values():
            gen.close()
