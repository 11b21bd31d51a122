"""Baseline policies: everything on the edge, everything in the cloud, or a seeded coin flip."""

from __future__ import annotations

import hashlib

from hera_ray.policy.base import Decision, Placement, Policy, SubtaskContext


class AllSLM(Policy):
    name = "all-slm"
    description = "Every subtask on an edge SLM."

    async def decide(self, ctx: SubtaskContext) -> Decision:
        return Decision(Placement.EDGE, self.name)


class AllLLM(Policy):
    name = "all-llm"
    description = "Every subtask on the cloud LLM."

    async def decide(self, ctx: SubtaskContext) -> Decision:
        return Decision(Placement.CLOUD, self.name)


class RandomPolicy(Policy):
    """Each subtask goes to the edge with probability ``slm_share``.

    The draw is a hash of (seed, request id, subtask index), so a request re-run after a
    restart is placed the same way.
    """

    name = "random"
    description = "Each subtask on the edge with a fixed probability."
    knob = "slm_share"

    def __init__(self, slm_share: float = 0.5, seed: int = 0):
        if not 0.0 <= slm_share <= 1.0:
            raise ValueError(f"slm_share must be in [0, 1], got {slm_share}")
        self.slm_share = slm_share
        self.seed = seed

    def draw(self, ctx: SubtaskContext) -> float:
        digest = hashlib.blake2b(f"{self.seed}:{ctx.request_id}:{ctx.index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def _at(self, value: float) -> "RandomPolicy":
        return RandomPolicy(value, self.seed)

    async def decide(self, ctx: SubtaskContext) -> Decision:
        u = self.draw(ctx)
        placement = Placement.EDGE if u < self.slm_share else Placement.CLOUD
        return Decision(placement, "random", {"draw": u, "slm_share": self.slm_share})


def build_policies(random_slm_share: float = 0.5, seed: int = 0, estimators=None, hera=None,
                   tau_hybrid: float = 0.78, verify: Policy | None = None,
                   routellm_threshold: float | None = 0.5, cascade_threshold: float = 0.9) -> dict[str, Policy]:
    """The policies a scheduler offers, by name (the model name clients pass): ``all-slm``, ``all-llm``,
    ``random`` and ``cascade`` (:mod:`hera_ray.policy.cascade`, at ``cascade_threshold``) always.

    With ``estimators`` (an :class:`~hera_ray.estimators.base.EstimatorSet` that also has
    ``hybrid_simple_prob``) it adds ``hera`` (configured by ``hera``, a
    :class:`~hera_ray.policy.hera.HeraPolicyConfig`), its ablations ``hera-no-urc``,
    ``hera-no-cd``, ``hera-no-sd``, ``hera-urc-only`` (URC, then the LLM: the paper's Table 4
    "URC alone" row), ``hera-spec`` (speculative SSE, see :mod:`hera_ray.policy.hera`), and
    ``hybridllm`` and ``routellm`` (RouteLLM's BERT-style router, at ``routellm_threshold``; None: a set
    without its classifier, not offered). ``verify``: the step-verifying policy (``hera-verify``), offered as given; it
    needs no estimator deployment.
    """
    from dataclasses import replace

    from hera_ray.policy.hera import HeraPolicy, HeraPolicyConfig
    from hera_ray.policy.hybrid import HybridLLMPolicy
    from hera_ray.policy.routellm import RouteLLMPolicy

    from hera_ray.policy.cascade import CascadePolicy

    policies: dict[str, Policy] = {p.name: p for p in (AllSLM(), AllLLM(), RandomPolicy(random_slm_share, seed),
                                                       CascadePolicy(cascade_threshold))}
    if verify is not None:
        policies[verify.name] = verify
    if estimators is not None:
        hera = hera or HeraPolicyConfig()
        policies["hera"] = HeraPolicy(estimators, hera)
        for stage in ("urc", "cd", "sd"):
            variant = HeraPolicy(estimators, replace(hera, **{f"use_{stage}": False}))
            variant.name = f"hera-no-{stage}"
            variant.description = f"HERA without its {stage.upper()} stage (ablation)."
            policies[variant.name] = variant
        urc_only = HeraPolicy(estimators, replace(hera, use_urc=True, use_sse=False))
        urc_only.name = "hera-urc-only"
        urc_only.description = "URC alone: a simple request on the SLM, every other subtask on the LLM (ablation)."
        policies[urc_only.name] = urc_only
        spec = HeraPolicy(estimators, replace(hera, speculative=True))
        spec.name = "hera-spec"
        spec.description = "HERA with speculative SSE: the SLM's real step, run first, replaces SP_SLM's prediction."
        policies[spec.name] = spec
        policies["hybridllm"] = HybridLLMPolicy(estimators, tau_hybrid)
        if routellm_threshold is not None:
            policies["routellm"] = RouteLLMPolicy(estimators, routellm_threshold)
    return policies
