"""A cascade in the manner of FrugalGPT and AutoMix: the SLM answers the whole request; a check of
its answer decides whether to keep it; when the check fails, the LLM answers the request again from
the start, and the request pays for both.

The check here is the SLM's own confidence in its chain: the geometric mean of the probabilities
of the tokens it generated (exp of their mean log-probability), which the edge returns with each
step at no extra cost. (FrugalGPT scores the answer with a trained model; AutoMix asks the SLM to
verify itself. Both cost more calls; this check costs none.) The threshold is the knob
(``cascade@0.9``): at or above it the SLM's answer stands; 0 never escalates, above 1 always does.
A chain with no log-probabilities to judge (none generated, or a backend that returns none) escalates.
The policy keeps no state: the agent says when a request was escalated (``SubtaskContext.escalated``).
The LLM's answer gets the same step and token caps as the SLM's, so an escalated request may write
up to twice the chain cap in all (it pays for both answers).

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

    def __init__(self, threshold: float = 0.9):
        if not 0.0 <= threshold <= 1.01:
            raise ValueError(f"threshold must be in [0, 1.01], got {threshold}")
        self.threshold = threshold

    def _at(self, value: float) -> "CascadePolicy":
        return CascadePolicy(value)

    @staticmethod
    def confidence(logprobs: tuple[float, ...]) -> float:
        """The geometric mean of the generated tokens' probabilities."""
        return math.exp(sum(logprobs) / len(logprobs))

    async def decide(self, ctx: SubtaskContext) -> Decision:
        if ctx.chain_logprobs is not None:  # the review of the SLM's finished chain
            if not ctx.chain_logprobs:  # nothing to judge (no tokens, or a backend that returns no log-probabilities)
                return Decision(Placement.CLOUD, "cascade-escalate", {"no_logprobs": 1.0, "threshold": self.threshold})
            conf = self.confidence(ctx.chain_logprobs)
            scores = {"slm_confidence": conf, "threshold": self.threshold, "tokens": float(len(ctx.chain_logprobs))}
            if conf >= self.threshold:
                return Decision(Placement.EDGE, "cascade-accept", scores)
            return Decision(Placement.CLOUD, "cascade-escalate", scores)
        if ctx.escalated:  # the agent says the review escalated: the LLM answers from the start
            return Decision(Placement.CLOUD, "cascade-llm")
        return Decision(Placement.EDGE, "cascade-slm", {"threshold": self.threshold}, logprobs=True, review=True)
