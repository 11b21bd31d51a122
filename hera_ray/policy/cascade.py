"""A cascade in the manner of FrugalGPT and AutoMix: the SLM answers the whole request; a check of
its answer decides whether to keep it; when the check fails, the LLM answers the request again from
the start, and the request pays for both.

The check here is the SLM's own confidence in its chain: the geometric mean of the probabilities
of the tokens it generated (exp of their mean log-probability), which the edge returns with each
step at no extra cost. (FrugalGPT scores the answer with a trained model; AutoMix asks the SLM to
verify itself. Both cost more calls; this check costs none.) The threshold is the knob
(``cascade@0.9``): at or above it the SLM's answer stands; 0 never escalates, above 1 always does.

Stages: ``cascade-slm`` (the SLM's steps), ``cascade-accept`` / ``cascade-escalate`` (the review,
with ``slm_confidence``), ``cascade-llm`` (the LLM's steps after escalating).
"""

from __future__ import annotations

import math

from hera_ray.policy.base import Decision, Placement, Policy, SubtaskContext


class CascadePolicy(Policy):
    name = "cascade"
    description = "Cascade (FrugalGPT/AutoMix): the SLM answers; below a confidence threshold the LLM answers again."
    knob = "threshold"

    def __init__(self, threshold: float = 0.9, max_requests: int = 10_000):
        if not 0.0 <= threshold <= 1.01:
            raise ValueError(f"threshold must be in [0, 1.01], got {threshold}")
        self.threshold = threshold
        self._escalated: dict[str, None] = {}  # insertion-ordered: the oldest are forgotten first
        self._max = max_requests

    def _at(self, value: float) -> "CascadePolicy":
        other = CascadePolicy(value, self._max)
        other._escalated = self._escalated  # request ids are unique across knob values
        return other

    @staticmethod
    def confidence(logprobs: tuple[float, ...]) -> float:
        """The geometric mean of the generated tokens' probabilities (1.0 for an empty chain)."""
        return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 1.0

    async def decide(self, ctx: SubtaskContext) -> Decision:
        if ctx.chain_logprobs is not None:  # the review of the SLM's finished chain
            conf = self.confidence(ctx.chain_logprobs)
            scores = {"slm_confidence": conf, "threshold": self.threshold, "tokens": float(len(ctx.chain_logprobs))}
            if conf >= self.threshold:
                return Decision(Placement.EDGE, "cascade-accept", scores)
            self._escalated[ctx.request_id] = None
            while len(self._escalated) > self._max:
                self._escalated.pop(next(iter(self._escalated)))
            return Decision(Placement.CLOUD, "cascade-escalate", scores)
        if ctx.request_id in self._escalated:
            return Decision(Placement.CLOUD, "cascade-llm")
        return Decision(Placement.EDGE, "cascade-slm", {"threshold": self.threshold}, logprobs=True, review=True)
