"""A RouteLLM-style query router (Ong et al., 2024: its BERT classifier router), trained on the same profile.

A classifier reads the request and gives the probabilities of three outcomes on it: the strong
model (the LLM) wins, a tie, or the weak model (the SLM) wins, labelled from the profile by who
answered correctly. (It is trained class-balanced, as URC and HybridLLM are, so its P(strong wins)
is a score to threshold, not a calibrated frequency.) RouteLLM sends a request to the strong model when P(strong wins) reaches a
threshold; so does this policy, for the whole request (every subtask), decided once per request.
The threshold is the knob (``routellm@0.3``): 0 sends everything to the LLM, above 1 nothing.

It differs from :mod:`hybridllm <hera_ray.policy.hybrid>` in what it learns: HybridLLM's label
merges "the SLM is as good" with "neither answers"; RouteLLM's keeps ties apart and asks only
whether the strong model would win.
"""

from __future__ import annotations

from typing import Protocol

from hera_ray.policy.base import Decision, Placement, Policy, RequestMemo, SubtaskContext


class StrongWinModel(Protocol):
    async def strong_win_prob(self, question: str) -> float: ...


class RouteLLMPolicy(Policy):
    name = "routellm"
    description = "RouteLLM (BERT-style router): the whole request on the LLM when P(the LLM wins) reaches a threshold."
    knob = "threshold"

    def __init__(self, router: StrongWinModel, threshold: float = 0.5, max_requests: int = 10_000):
        if not 0.0 <= threshold <= 1.01:
            raise ValueError(f"threshold must be in [0, 1.01], got {threshold}")
        self.router = router
        self.threshold = threshold
        self._p = RequestMemo(max_requests)

    def _at(self, value: float) -> "RouteLLMPolicy":
        other = RouteLLMPolicy(self.router, value)
        other._p = self._p  # P(strong wins) does not depend on the threshold: share the per-request memo
        return other

    async def decide(self, ctx: SubtaskContext) -> Decision:
        p = await self._p.get(ctx.request_id, lambda: self.router.strong_win_prob(ctx.question))
        placement = Placement.CLOUD if p >= self.threshold else Placement.EDGE
        return Decision(placement, "routellm", {"p_strong_wins": p, "threshold": self.threshold})
