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
    (0.8, (), "cascade-accept"),  # nothing generated: nothing to doubt
])
def test_the_review_compares_the_chain_s_geometric_mean_probability_with_the_threshold(threshold, chain, stage):
    policy = CascadePolicy().tuned(threshold)
    d = decide(policy, chain=chain)
    assert d.stage == stage and (d.placement is Placement.CLOUD) == (stage == "cascade-escalate")
    assert d.scores["threshold"] == threshold and d.scores["tokens"] == len(chain)
    # After escalating, the request's steps go to the LLM; other requests still start on the SLM.
    later = decide(policy, index=0)
    assert later.stage == ("cascade-llm" if stage == "cascade-escalate" else "cascade-slm")
    assert decide(policy, request_id="other").stage == "cascade-slm"


def test_the_knob_is_checked_and_old_requests_are_forgotten():
    with pytest.raises(ValueError, match="threshold"):
        CascadePolicy().tuned(2.0)
    policy = CascadePolicy(1.01, max_requests=2)
    for rid in ("a", "b", "c"):
        decide(policy, request_id=rid, chain=(0.0,))
    assert decide(policy, request_id="a").stage == "cascade-slm" and decide(policy, request_id="c").stage == "cascade-llm"
