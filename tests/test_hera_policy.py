"""The HERA decision procedure as pure code, over a scripted stand-in for trained estimators.

``ScriptedEstimators`` is a stand-in: it returns the values each test scripts, so every branch of
the policy (URC, SSE, CD, SD, LLM) and the κ schedule are checked without models. The real,
trained estimators plug into the same interface.
"""

from __future__ import annotations

import asyncio

import pytest

from hera_ray.policy.base import Placement, SubtaskContext
from hera_ray.policy.hera import HeraPolicy, HeraPolicyConfig


class ScriptedEstimators:
    """Stand-in estimator set: scripted answers, and a log of what the policy asked."""

    def __init__(self, p_simple=0.0, slm="s", llm="l", sims=None, distance=None, rolled=None, parts=(), part_preds=None):
        self.p_simple, self.slm, self.llm = p_simple, slm, llm
        self.sims = sims or {}  # (a, b) -> similarity; default 0
        self.dist, self.rolled, self.parts = distance, rolled or {}, list(parts)
        self.part_preds = part_preds or {}
        self.calls: list[str] = []

    async def request_simple_prob(self, question):
        self.calls.append("urc")
        return self.p_simple

    async def predict_subtask(self, side, ctx, extra=()):
        self.calls.append(f"sp_{side}:{len(extra)}")
        if side == "llm":
            return self.llm
        if extra and extra[-1] in self.part_preds:  # predicting after a sub-subtask
            return self.part_preds[extra[-1]]
        return self.rolled.get(len(extra), self.slm)

    async def distance(self, ctx, slm_next=None, slm_logprobs=None):
        self.calls.append("dp")
        self.dp_slm_next, self.dp_slm_logprobs = slm_next, slm_logprobs
        return self.dist

    async def decompose(self, subtask, ctx):
        self.calls.append("sd")
        return self.parts

    async def similarity(self, a, b):
        return self.sims.get((a, b), 0.0)


def decide(est, index=0, config=None, request_id="r"):
    policy = HeraPolicy(est, config or HeraPolicyConfig())
    return asyncio.run(policy.decide(SubtaskContext(request_id, "q", index))), policy


@pytest.mark.parametrize("index, kappa", [(0, 0.60), (1, 0.62), (3, 0.66), (5, 0.70), (9, 0.70)])
def test_kappa_grows_with_position_then_caps(index, kappa):
    assert HeraPolicyConfig().kappa(index) == pytest.approx(kappa)
    assert HeraPolicyConfig(threshold_base=0.7).kappa(index) == pytest.approx(kappa + 0.1)


def test_urc_simple_request_goes_to_the_slm_and_is_asked_once_per_request():
    est = ScriptedEstimators(p_simple=0.9)
    d, policy = decide(est)
    assert (d.placement, d.stage, d.scores["urc_p_simple"]) == (Placement.EDGE, "urc", 0.9)
    asyncio.run(policy.decide(SubtaskContext("r", "q", 1)))
    assert est.calls.count("urc") == 1 and not any(c.startswith("sp_") for c in est.calls)


def test_sse_similar_predictions_go_to_the_slm():
    est = ScriptedEstimators(sims={("s", "l"): 0.61})
    d, _ = decide(est, index=0)
    assert (d.placement, d.stage) == (Placement.EDGE, "sse")
    d, _ = decide(ScriptedEstimators(sims={("s", "l"): 0.61}), index=1)  # κ_1 = 0.62: not enough
    assert d.stage != "sse"


def test_cd_rolls_the_slm_forward_distance_plus_one_steps():
    est = ScriptedEstimators(sims={("s", "l"): 0.1, ("s3", "l"): 0.9}, distance=2, rolled={2: "s3"})
    d, _ = decide(est)
    assert (d.placement, d.stage, d.scores["cd_distance"], d.scores["cd_sim"]) == (Placement.EDGE, "cd", 2.0, 0.9)
    # SP_SLM asked for the current step (the 1st SLM subtask), then rolled 2 more (after 1, then 2 predicted)
    assert [c for c in est.calls if c.startswith("sp_slm")] == ["sp_slm:0", "sp_slm:1", "sp_slm:2"]
    assert est.dp_slm_next == "s"  # DP is given the SLM's predicted subtask (a context+slm set reads it)
    assert est.dp_slm_logprobs is None  # predicted, not written: a confidence set scores it itself


def test_distance_zero_does_not_repeat_the_sse_test():
    est = ScriptedEstimators(sims={("s", "l"): 0.1}, distance=0)
    d, _ = decide(est)
    assert d.stage == "llm" and d.scores["cd_distance"] == 0.0 and "cd_sim" not in d.scores
    assert [c for c in est.calls if c.startswith("sp_slm")] == ["sp_slm:0"]


def test_infinite_distance_skips_cd():
    est = ScriptedEstimators(distance=None)
    d, _ = decide(est)
    assert d.scores["cd_distance"] == float("inf") and "cd_sim" not in d.scores


def test_sd_all_parts_similar_go_to_the_slm():
    est = ScriptedEstimators(parts=["p1", "p2"], part_preds={"p1": "q2"},
                             sims={("s", "p1"): 0.8, ("q2", "p2"): 0.75})
    d, _ = decide(est)
    assert (d.placement, d.stage, d.scores["sd_parts"], d.scores["sd_min_sim"]) == (Placement.EDGE, "sd", 2.0, 0.75)


def test_sd_one_dissimilar_part_sends_it_to_the_llm():
    est = ScriptedEstimators(parts=["p1", "p2"], part_preds={"p1": "q2"}, sims={("s", "p1"): 0.8, ("q2", "p2"): 0.3})
    d, _ = decide(est)
    assert (d.placement, d.stage) == (Placement.CLOUD, "llm")


def test_nothing_passes_goes_to_the_llm():
    d, _ = decide(ScriptedEstimators())
    assert (d.placement, d.stage) == (Placement.CLOUD, "llm")
    assert {"kappa", "urc_p_simple", "sse_sim", "cd_distance", "sd_parts"} <= set(d.scores)


def test_ablations_switch_stages_off():
    est = ScriptedEstimators(p_simple=0.99, distance=1, rolled={1: "x"}, sims={("x", "l"): 0.99})
    d, _ = decide(est, config=HeraPolicyConfig(use_urc=False))
    assert d.stage == "cd" and "urc" not in est.calls
    est = ScriptedEstimators(distance=0, parts=["p"], sims={("s", "l"): 0.0, ("s", "p"): 0.99})
    d, _ = decide(est, config=HeraPolicyConfig(use_urc=False, use_cd=False))
    assert d.stage == "sd" and "dp" not in est.calls
    d, _ = decide(ScriptedEstimators(parts=["p"], sims={("s", "p"): 0.99}),
                  config=HeraPolicyConfig(use_urc=False, use_cd=False, use_sd=False))
    assert d.stage == "llm"


class ScriptedQueryRouter:
    """Stand-in for the trained HybridLLM classifier: a scripted P(simple) per question."""

    def __init__(self, p: dict[str, float]):
        self.p, self.asked = p, []

    async def hybrid_simple_prob(self, question):
        self.asked.append(question)
        return self.p[question]


def test_hybridllm_decides_once_per_request_for_every_subtask():
    from hera_ray.policy.hybrid import HybridLLMPolicy

    router = ScriptedQueryRouter({"easy": 0.8, "hard": 0.2})
    policy = HybridLLMPolicy(router, tau=0.5)
    easy = [asyncio.run(policy.decide(SubtaskContext("r1", "easy", i))) for i in range(3)]
    hard = [asyncio.run(policy.decide(SubtaskContext("r2", "hard", i))) for i in range(3)]
    assert {d.placement for d in easy} == {Placement.EDGE}
    assert {d.placement for d in hard} == {Placement.CLOUD}
    assert {d.stage for d in easy + hard} == {"hybridllm"}
    assert easy[0].scores == {"p_simple": 0.8, "tau": 0.5}
    assert router.asked == ["easy", "hard"]  # one classifier call per request, not per subtask


class ScriptedStrongWin:
    """Stand-in for the trained RouteLLM-style classifier: a scripted P(the LLM wins) per question."""

    def __init__(self, p: dict[str, float]):
        self.p, self.asked = p, []

    async def strong_win_prob(self, question):
        self.asked.append(question)
        return self.p[question]


@pytest.mark.parametrize("threshold, placements", [(0.5, ("edge", "cloud")), (0.0, ("cloud", "cloud")),
                                                   (1.01, ("edge", "edge"))])
def test_routellm_sends_a_request_to_the_llm_when_the_llm_would_win_once_per_request(threshold, placements):
    from hera_ray.policy.routellm import RouteLLMPolicy

    router = ScriptedStrongWin({"easy": 0.1, "hard": 0.7})
    policy = RouteLLMPolicy(router).tuned(threshold)
    assert policy.name == f"routellm@{threshold:g}"
    easy = [asyncio.run(policy.decide(SubtaskContext("r1", "easy", i))) for i in range(3)]
    hard = [asyncio.run(policy.decide(SubtaskContext("r2", "hard", i))) for i in range(3)]
    assert ({d.placement.value for d in easy}, {d.placement.value for d in hard}) == ({placements[0]}, {placements[1]})
    assert hard[0].stage == "routellm" and hard[0].scores == {"p_strong_wins": 0.7, "threshold": threshold}
    assert router.asked == ["easy", "hard"]  # one classifier call per request, not per subtask
    with pytest.raises(ValueError, match="threshold"):
        RouteLLMPolicy(router).tuned(1.5)


def test_build_policies_offers_hera_its_ablations_and_hybridllm_only_with_estimators():
    from hera_ray.policy import build_policies

    assert set(build_policies()) == {"all-slm", "all-llm", "random", "cascade"}
    est = ScriptedEstimators(p_simple=0.9)
    policies = build_policies(estimators=est, hera=HeraPolicyConfig(threshold_base=0.7), tau_hybrid=0.3)
    assert set(policies) == {"all-slm", "all-llm", "random", "hera", "hera-no-urc", "hera-no-cd", "hera-no-sd",
                             "hera-urc-only", "hera-spec", "hybridllm", "routellm", "cascade"}
    assert policies["hera"].config.threshold_base == 0.7
    assert not policies["hera-no-urc"].config.use_urc and policies["hera-no-urc"].config.threshold_base == 0.7
    assert policies["hera-no-sd"].name == "hera-no-sd" and policies["hera"].name == "hera"
    # URC on: a simple request goes to the edge; with URC off the same request reaches SSE.
    ctx = SubtaskContext("r", "q", 0)
    assert asyncio.run(policies["hera"].decide(ctx)).stage == "urc"
    assert asyncio.run(policies["hera-no-urc"].decide(ctx)).stage == "llm"


def test_urc_only_keeps_simple_requests_on_the_slm_and_sends_the_rest_to_the_llm():
    from hera_ray.policy import build_policies

    policies = build_policies(estimators=ScriptedEstimators(p_simple=0.9))
    ctx = SubtaskContext("r", "q", 0)
    assert asyncio.run(policies["hera-urc-only"].decide(ctx)).stage == "urc"
    est = ScriptedEstimators(p_simple=0.1, sims={("s", "l"): 0.99})  # SSE would say SLM: never asked
    d = asyncio.run(build_policies(estimators=est)["hera-urc-only"].decide(ctx))
    assert (d.placement, d.stage) == (Placement.CLOUD, "llm") and est.calls == ["urc"]


def test_tuned_hera_moves_only_the_threshold_and_shares_the_urc_memo():
    est = ScriptedEstimators(sims={("s", "l"): 0.75})
    policy = HeraPolicy(est, HeraPolicyConfig(use_urc=True, use_cd=False, use_sd=False))
    low, high = policy.tuned(0.7), policy.tuned(0.8)
    assert (low.name, high.name) == ("hera@0.7", "hera@0.8")
    ctx = SubtaskContext("r", "q", 0)
    assert asyncio.run(low.decide(ctx)).placement is Placement.EDGE   # 0.75 >= 0.70
    assert asyncio.run(high.decide(ctx)).placement is Placement.CLOUD  # 0.75 <  0.80
    assert est.calls.count("urc") == 1  # P(simple) is the request's, whatever the threshold
    assert policy.config.threshold_base == 0.6 and not high.config.use_cd
    with pytest.raises(ValueError, match="threshold_base"):
        policy.tuned(3.0)


def test_speculative_hera_asks_for_the_slm_step_first_then_tests_what_the_slm_wrote():
    from hera_ray.policy.base import SPECULATE

    est = ScriptedEstimators(sims={("real", "l"): 0.9, ("s", "l"): 0.0})
    policy = HeraPolicy(est, HeraPolicyConfig(use_urc=False, use_cd=False, use_sd=False, speculative=True))
    first = asyncio.run(policy.decide(SubtaskContext("r", "q", 0)))
    assert (first.placement, first.stage) == (Placement.EDGE, SPECULATE)
    assert not first.logprobs  # no CD here: DP is never asked, so the step needs no log-probabilities

    async def both():
        first = await policy.decide(SubtaskContext("r2", "q", 0))
        second = await policy.decide(SubtaskContext("r2", "q", 0, slm_candidate="real"))
        return first, second

    est.calls.clear()
    first, second = asyncio.run(both())
    assert first.stage == SPECULATE and (second.placement, second.stage) == (Placement.EDGE, "sse")
    assert second.scores["sse_sim"] == 0.9
    assert "sp_slm:0" not in est.calls and est.calls.count("sp_llm:0") == 1  # SP_LLM once; no SP_SLM at all
    rejected = asyncio.run(policy.decide(SubtaskContext("r3", "q", 0, slm_candidate="other")))
    assert (rejected.placement, rejected.stage) == (Placement.CLOUD, "llm")


def test_speculative_hera_gives_dp_the_slm_step_it_wrote_with_its_log_probabilities():
    est = ScriptedEstimators(sims={("real", "l"): 0.1}, distance=None)
    policy = HeraPolicy(est, HeraPolicyConfig(use_urc=False, use_sd=False, speculative=True))
    first = asyncio.run(policy.decide(SubtaskContext("r", "q", 0)))
    assert first.stage == "speculate" and first.logprobs  # the SLM's step comes back with them
    d = asyncio.run(policy.decide(SubtaskContext("r", "q", 0, slm_candidate="real", slm_logprobs=(-0.1, -2.5))))
    assert (d.placement, d.scores["cd_distance"]) == (Placement.CLOUD, float("inf"))
    assert (est.dp_slm_next, est.dp_slm_logprobs) == ("real", (-0.1, -2.5))
