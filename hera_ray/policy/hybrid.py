"""HybridLLM (Ding et al., ICLR 2024): one decision per request, the paper's main baseline.

A difficulty classifier trained on the same profile gives P(the SLM's answer is as good as the
LLM's); at or above ``tau`` the whole request runs on the SLM, else wholly on the LLM. Subtask
positions after the first reuse the request's decision.
"""

from __future__ import annotations

from typing import Protocol

from hera_ray.policy.base import Decision, Placement, Policy, RequestMemo, SubtaskContext


class QueryRouterModel(Protocol):
    async def hybrid_simple_prob(self, question: str) -> float: ...


class HybridLLMPolicy(Policy):
    name = "hybridllm"
    description = "HybridLLM: the whole request on the SLM or the LLM, by a trained difficulty classifier."
    knob = "tau"

    def __init__(self, router: QueryRouterModel, tau: float = 0.78, max_requests: int = 10_000):
        self.router = router
        self.tau = tau
        self._p = RequestMemo(max_requests)

    def _at(self, value: float) -> "HybridLLMPolicy":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {value}")
        other = HybridLLMPolicy(self.router, value)
        other._p = self._p  # P(simple) does not depend on tau: share the per-request memo
        return other

    async def decide(self, ctx: SubtaskContext) -> Decision:
        p = await self._p.get(ctx.request_id, lambda: self.router.hybrid_simple_prob(ctx.question))
        placement = Placement.EDGE if p >= self.tau else Placement.CLOUD
        return Decision(placement, "hybridllm", {"p_simple": p, "tau": self.tau})
