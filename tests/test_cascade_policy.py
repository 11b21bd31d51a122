"""The cascade policy as pure code: the SLM's steps ask for their log-probabilities and a review;
the review keeps a confident chain and escalates the rest, and every later step of an escalated
request goes to the LLM."""

from __future__ import annotations

import asyncio
import math

import pytest

from hera_ray.policy.base import Placement, SubtaskContext
from hera_ray.policy.cascade import CascadePolicy


def decide(policy, request_id="r", index=0, chain=None):
    return asyncio.run(policy.decide(SubtaskContext(request_id, "q", index, chain_logprobs=chain)))


def test_slm_steps_ask_for_logprobs_and_a_review():
    d = decide(CascadePolicy(0.8))
    assert (d.placement, d.stage, d.logprobs, d.review) == (Placement.EDGE, "cascade-slm", True, True)


@pytest.mark.parametrize("threshold, chain, stage", [
    (0.8, (math.log(0.9),) * 5, "cascade-accept"),
    (0.8, (math.log(0.9), math.log(0.5)), "cascade-escalate"),  # geometric mean 0.67
    (0.0, (-50.0,), "cascade-accept"),  # 0: never escalates
    (1.01, (0.0,), "cascade-escalate"),  # above 1: always
    (0.8, (), "cascade-escalate"),  # no log-probabilities to judge: the LLM answers
])
def test_the_review_compares_the_chain_s_geometric_mean_probability_with_the_threshold(threshold, chain, stage):
    policy = CascadePolicy().tuned(threshold)
    d = decide(policy, chain=chain)
    assert d.stage == stage and (d.placement is Placement.CLOUD) == (stage == "cascade-escalate")
    assert d.scores["threshold"] == threshold
    assert d.scores.get("tokens", 0.0) == len(chain) and ("no_logprobs" in d.scores) == (not chain)


def test_an_escalated_request_s_steps_go_to_the_llm_and_the_knob_is_checked():
    policy = CascadePolicy(0.9)
    later = asyncio.run(policy.decide(SubtaskContext("r", "q", 0, escalated=True)))
    assert (later.placement, later.stage, later.review) == (Placement.CLOUD, "cascade-llm", False)
    assert decide(policy).stage == "cascade-slm"  # the policy keeps no state: the agent says it escalated
    with pytest.raises(ValueError, match="threshold"):
        CascadePolicy().tuned(2.0)
