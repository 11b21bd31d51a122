"""The HERA policy (arXiv 2504.00434), as plain code over an :class:`EstimatorSet`.

For request R and subtask i:

1. **URC** — if URC says R is simple (P(simple) >= ``tau_req``), every subtask of R runs on the
   SLM (decided once per request).
2. **SSE** — threshold κ_i = ``threshold_base`` + min(i, ``kappa_cap``) · ``kappa_step``.
   s_S = SP_SLM(context), s_L = SP_LLM(context); if sim(s_S, s_L) >= κ_i, the SLM runs it.
3. **SLE / CD** — else d = DP(context) (a set trained with ``dp_input=context+slm`` also reads s_S); if 1 <= d <= ``max_distance``, roll SP_SLM forward to
   its (d+1)-th subtask (the first is s_S); if that one is >= κ_i similar to s_L, the SLM runs
   it: it is expected to converge with the LLM's path. (d = 0 would repeat SSE's test.)
4. **SD** — else decompose s_L; if every sub-subtask passes SSE (its SLM prediction is >= κ_i
   similar to it), the SLM runs the subtask; otherwise the LLM does (stage ``llm``).

**Speculative SSE** (``speculative=True``, the ``hera-spec`` policy; not in the paper): the SLM's
step is cheap, so instead of predicting the SLM's subtask with SP_SLM the policy first answers
``speculate``: the agent runs the SLM's step on the edge while SP_LLM predicts the LLM's subtask,
then asks again with the subtask the SLM really wrote. If that passes SSE (or CD/SD) the step
already ran and is kept; otherwise the LLM runs it and the SLM's step is discarded (its time is
reported as ``speculative_s``).

Each decision records its ``stage`` (``urc``, ``sse``, ``cd``, ``sd`` or ``llm``) and the scores
that decided it. Stages can be switched off for ablations.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from hera_ray.estimators.base import EstimatorSet
from collections import OrderedDict

from hera_ray.policy.base import SPECULATE, Decision, Placement, Policy, RequestMemo, SubtaskContext


@dataclass(frozen=True)
class HeraPolicyConfig:
    threshold_base: float = 0.6
    kappa_step: float = 0.02
    kappa_cap: int = 5
    tau_req: float = 0.78  # the paper's operating point (τ_req 0.50 -> 0.78 raised accuracy 74.3 -> 77.9)
    use_urc: bool = True
    #: Off: no subtask-level stage (SSE, CD, SD) runs; what URC does not keep goes to the LLM.
    use_sse: bool = True
    use_cd: bool = True
    use_sd: bool = True
    max_distance: int = 5
    max_sub_subtasks: int = 6
    #: Run the SLM's step before deciding and test its real subtask instead of SP_SLM's prediction.
    speculative: bool = False

    def kappa(self, index: int) -> float:
        """The position-aware similarity threshold of subtask ``index``."""
        return self.threshold_base + min(index, self.kappa_cap) * self.kappa_step


class HeraPolicy(Policy):
    name = "hera"
    description = "HERA: per-subtask placement by URC, subtask similarity, convergence and decomposition."
    knob = "threshold_base"

    def __init__(self, estimators: EstimatorSet, config: HeraPolicyConfig | None = None, max_requests: int = 10_000):
        self.est = estimators
        self.config = config or HeraPolicyConfig()
        self._urc = RequestMemo(max_requests)  # request id -> P(simple), decided once
        # Speculative mode: SP_LLM's prediction, started while the SLM's step runs.
        self._pending: OrderedDict[tuple[str, int], asyncio.Future] = OrderedDict()
        self._max_pending = max_requests

    def _at(self, value: float) -> "HeraPolicy":
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"threshold_base must be in [-1, 1], got {value}")
        other = HeraPolicy(self.est, replace(self.config, threshold_base=value))
        other._urc = self._urc  # URC's P(simple) does not depend on the threshold
        other._pending = self._pending  # nor does SP_LLM's prediction
        other.description = self.description
        return other

    async def _request_simple_prob(self, ctx: SubtaskContext) -> float:
        return await self._urc.get(ctx.request_id, lambda: self.est.request_simple_prob(ctx.question))

    async def decide(self, ctx: SubtaskContext) -> Decision:
        c = self.config
        kappa = c.kappa(ctx.index)
        scores: dict[str, float] = {"kappa": kappa}
        if c.use_urc:
            p_simple = await self._request_simple_prob(ctx)
            scores["urc_p_simple"] = p_simple
            if p_simple >= c.tau_req:
                return Decision(Placement.EDGE, "urc", scores)

        if not c.use_sse:
            return Decision(Placement.CLOUD, "llm", scores)

        if c.speculative and ctx.slm_candidate is None:
            # Start SP_LLM now; the SLM's real step comes back with the agent's second call.
            key = (ctx.request_id, ctx.index)
            if key not in self._pending:
                self._pending[key] = asyncio.ensure_future(self.est.predict_subtask("llm", ctx))
                while len(self._pending) > self._max_pending:
                    self._pending.popitem(last=False)[1].cancel()
            # DP reads the SLM's confidence in its step (a "confidence" set): the step comes back with it.
            return Decision(Placement.EDGE, SPECULATE, scores, logprobs=c.use_cd)
        if c.speculative:
            pending = self._pending.pop((ctx.request_id, ctx.index), None)
            s_slm = ctx.slm_candidate.strip()
            s_llm = await pending if pending is not None else await self.est.predict_subtask("llm", ctx)
        else:
            # The two sides are separate models: predict both at once.
            s_slm, s_llm = await asyncio.gather(self.est.predict_subtask("slm", ctx), self.est.predict_subtask("llm", ctx))
        sim = await self.est.similarity(s_slm, s_llm)
        scores["sse_sim"] = sim
        if sim >= kappa:
            return Decision(Placement.EDGE, "sse", scores)

        if c.use_cd:
            # The SLM's step came with its token log-probabilities when the SLM wrote it (speculative).
            d = await self.est.distance(ctx, s_slm, ctx.slm_logprobs if c.speculative else None)
            scores["cd_distance"] = float("inf") if d is None else float(d)
            # d = 0 says the SLM's current subtask already lines up: SSE just tested exactly that.
            if d is not None and 1 <= d <= c.max_distance:
                rolled: tuple[str, ...] = (s_slm,)  # the 1st SLM subtask is SSE's prediction; roll d more
                for _ in range(d):
                    rolled += (await self.est.predict_subtask("slm", ctx, rolled),)
                cd_sim = await self.est.similarity(rolled[-1], s_llm)
                scores["cd_sim"] = cd_sim
                if cd_sim >= kappa:
                    return Decision(Placement.EDGE, "cd", scores)

        if c.use_sd:
            parts = (await self.est.decompose(s_llm, ctx))[: c.max_sub_subtasks]
            scores["sd_parts"] = float(len(parts))
            if parts:
                worst = 1.0
                for k, part in enumerate(parts):
                    predicted = await self.est.predict_subtask("slm", ctx, tuple(parts[:k]))
                    worst = min(worst, await self.est.similarity(predicted, part))
                    if worst < kappa:
                        break
                scores["sd_min_sim"] = worst
                if worst >= kappa:
                    return Decision(Placement.EDGE, "sd", scores)

        return Decision(Placement.CLOUD, "llm", scores)
