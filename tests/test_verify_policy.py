"""hera-verify's every branch, as pure code: the policy over a hand-written step classifier (a
stand-in for the one `hera train` fits; its file format is the real one)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from hera_ray.errors import ConfigError
from hera_ray.policy.base import SPECULATE, Placement, SubtaskContext
from hera_ray.policy.verify import (KEPT_BLANK, KEPT_BY_CLASSIFIER, KEPT_BY_CONFIDENCE, KEPT_BY_LLM, REWRITTEN, VERIFY,
                                    StepClassifier, VerifyConfig, VerifyPolicy, geo_mean_prob, llm_step_score,
                                    step_features)


def by_mean_logprob(weight: float = 4.0, at: float = -0.5) -> StepClassifier:
    """P(good) = sigmoid(weight · (mean_logprob - at)): 0.5 where the step's mean log-probability is ``at``."""
    return StepClassifier(("mean_logprob",), (at,), (1.0,), (weight,), 0.0, {"accuracy": 1.0})


def ctx(candidate: str | None = "x = 3 + 4", slm=(-0.5, -0.5), llm=None, top=None, index: int = 2) -> SubtaskContext:
    return SubtaskContext("r1", "What is 3 + 4?", index, (), candidate, None if slm is None else tuple(slm),
                          None if llm is None else tuple(llm), None if top is None else tuple(top))


def decide(policy: VerifyPolicy, c: SubtaskContext):
    return asyncio.run(policy.decide(c))


def test_the_slm_writes_every_step_first():
    d = decide(VerifyPolicy(), ctx(candidate=None, slm=None))
    assert (d.placement, d.stage) == (Placement.EDGE, SPECULATE)


def test_a_confident_step_is_kept_without_classifier_or_llm():
    policy = VerifyPolicy(VerifyConfig(confidence_keep=0.9), by_mean_logprob())
    d = decide(policy, ctx(slm=(-0.01, -0.02, 0.0)))
    assert (d.placement, d.stage) == (Placement.EDGE, KEPT_BY_CONFIDENCE)
    assert d.scores["slm_confidence"] == pytest.approx(math.exp(-0.01)) and "p_good" not in d.scores


def test_the_classifier_keeps_a_step_it_rates_at_least_the_knob():
    policy = VerifyPolicy(VerifyConfig(keep=0.6, confidence_keep=0.99), by_mean_logprob(at=-0.5))
    d = decide(policy, ctx(slm=(-0.3, -0.3)))  # P(good) = sigmoid(0.8) = 0.69
    assert (d.placement, d.stage) == (Placement.EDGE, KEPT_BY_CLASSIFIER)
    assert d.scores["p_good"] == pytest.approx(1 / (1 + math.exp(-0.8))) and d.scores["keep"] == 0.6


def test_a_borderline_step_goes_to_the_llm_to_be_scored():
    policy = VerifyPolicy(VerifyConfig(keep=0.6, confidence_keep=0.99), by_mean_logprob(at=-0.5))
    d = decide(policy, ctx(slm=(-0.6, -0.6)))  # P(good) = 0.40 < 0.6
    assert (d.placement, d.stage) == (Placement.CLOUD, VERIFY)
    assert d.scores["p_good"] < 0.6


def test_a_borderline_step_may_wait_for_a_batched_check_unless_it_is_likely_rejected():
    policy = VerifyPolicy(VerifyConfig(keep=0.6, confidence_keep=0.99, check_batch=3, batch_above=0.3),
                          by_mean_logprob(at=-0.5))
    assert decide(policy, ctx(slm=(-0.6, -0.6))).check_batch == 3  # P(good) 0.40: may wait
    d = decide(policy, ctx(slm=(-0.9, -0.9)))  # P(good) 0.17: checked at once, closing its batch
    assert (d.stage, d.check_batch) == (VERIFY, 1) and d.scores["p_good"] < 0.3
    assert decide(VerifyPolicy(VerifyConfig(keep=0.6, confidence_keep=0.99), by_mean_logprob()),
                  ctx(slm=(-0.6, -0.6))).check_batch == 1  # the default: each step at once


def test_the_llm_keeps_a_step_it_scores_well_and_rewrites_one_it_does_not():
    policy = VerifyPolicy(VerifyConfig(llm_accept=0.5), by_mean_logprob())
    # A line: its last token (the re-tokenised line end) does not count: exp(mean(0, -0.1)) = 0.95.
    kept = decide(policy, ctx(candidate="x = 3 + 4\n", llm=(-0.2, -1.0, -0.3), top=(-0.2, -0.9, -0.1)))
    assert (kept.placement, kept.stage) == (Placement.EDGE, KEPT_BY_LLM)
    assert kept.scores["llm_score"] == pytest.approx(math.exp(-0.05)) and kept.scores["llm_accept"] == 0.5
    rejected = decide(policy, ctx(candidate="x = 3 + 4\n", llm=(-3.0, -2.0, -0.1), top=(-0.1, -0.1, -0.1)))
    assert (rejected.placement, rejected.stage) == (Placement.CLOUD, REWRITTEN)
    assert rejected.scores["llm_score"] < 0.5
    # A step that ended the message is scored whole: its last token is the answer's last digit.
    last = decide(policy, ctx(candidate="Answer: 18", llm=(-0.1, -0.1, -4.0), top=(-0.1, -0.1, -0.1)))
    assert last.stage == REWRITTEN and last.scores["llm_score"] == pytest.approx(math.exp(-3.9 / 3))


def test_a_hopeless_step_is_rewritten_without_a_check():
    policy = VerifyPolicy(VerifyConfig(keep=0.6, confidence_keep=0.99, reject_below=0.2), by_mean_logprob(at=-0.5))
    d = decide(policy, ctx(slm=(-3.0, -3.0)))  # P(good) ~ 0
    assert (d.placement, d.stage) == (Placement.CLOUD, REWRITTEN) and d.scores["p_good"] < 0.2


def test_an_empty_step_is_the_llms_and_a_blank_line_is_kept():
    d = decide(VerifyPolicy(), ctx(candidate="", slm=()))
    assert (d.placement, d.stage) == (Placement.CLOUD, REWRITTEN)
    d = decide(VerifyPolicy(), ctx(candidate="\n", slm=(-0.9,)))
    assert (d.placement, d.stage) == (Placement.EDGE, KEPT_BLANK)


def test_without_a_classifier_the_confidence_is_p_good():
    policy = VerifyPolicy(VerifyConfig(keep=0.5, confidence_keep=0.99))
    kept = decide(policy, ctx(slm=(-0.3,)))  # confidence 0.74
    assert (kept.placement, kept.stage) == (Placement.EDGE, KEPT_BY_CONFIDENCE)
    assert kept.scores["p_good"] == pytest.approx(math.exp(-0.3))
    checked = decide(policy, ctx(slm=(-1.0,)))
    assert checked.stage == VERIFY
    # A step without log-probabilities (a backend that returns none) has confidence 0: it is checked.
    assert decide(policy, ctx(slm=None)).stage == VERIFY


def test_by_default_the_llm_check_clears_the_same_bar_as_the_classifier():
    policy = VerifyPolicy(VerifyConfig(keep=0.8), by_mean_logprob())
    assert policy.llm_accept == 0.8 and policy.tuned(0.95).llm_accept == 0.95
    c = ctx(candidate="x = 3 + 4\n", llm=(-0.3, -0.3, -0.1), top=(-0.1, -0.1, -0.1))  # score exp(-0.2) = 0.82
    assert decide(policy, c).stage == KEPT_BY_LLM and decide(policy.tuned(0.9), c).stage == REWRITTEN
    assert VerifyPolicy(VerifyConfig(keep=0.9, llm_accept=0.5)).llm_accept == 0.5


def test_the_knob_is_keep_and_is_range_checked():
    policy = VerifyPolicy(VerifyConfig(keep=0.7, confidence_keep=0.99), by_mean_logprob(at=-0.5))
    strict = policy.tuned(0.95)
    assert strict.name == "hera-verify@0.95" and strict.config.keep == 0.95 and strict.classifier is policy.classifier
    c = ctx(slm=(-0.2, -0.2))  # P(good) = 0.77
    assert decide(policy, c).stage == KEPT_BY_CLASSIFIER and decide(strict, c).stage == VERIFY
    with pytest.raises(ValueError, match="keep must be in"):
        policy.tuned(1.5)


def test_llm_step_score_is_one_where_the_llm_would_write_the_same_tokens():
    assert llm_step_score((-0.7, -0.1), (-0.7, -0.1)) == 1.0
    assert llm_step_score((-2.0,), (-0.5,)) == pytest.approx(math.exp(-1.5))
    assert llm_step_score((), ()) == 0.0
    assert llm_step_score((-0.5,), None) == pytest.approx(math.exp(-0.5))  # no top choices: plain probability
    # The last token (the re-tokenised line end) does not count, unless it is the only one.
    assert llm_step_score((-1.0, -0.2, -6.0), (-0.5, -0.2, -0.1)) == pytest.approx(math.exp(-0.25))
    assert llm_step_score((-1.0, -0.2, -6.0), (-0.5, -0.2, -0.1), line_end=False) == pytest.approx(math.exp(-6.4 / 3))
    assert geo_mean_prob(None) == 0.0 and geo_mean_prob((-1.0, -3.0)) == pytest.approx(math.exp(-2.0))


def test_features_read_the_steps_confidence_and_shape():
    f = step_features("Write a python function", 3, "    return a + b\n", (-0.1, -2.0, -0.05))
    assert f["min_logprob"] == -2.0 and f["code_line"] == 1.0 and f["question_code"] == 1.0
    assert f["frac_below_0.5"] == pytest.approx(1 / 3) and f["position"] == pytest.approx(math.log(4))
    empty = step_features("q", 0, "", ())
    assert empty["blank"] == 1.0 and empty["mean_logprob"] == 0.0
    # Numbers the step computed (in neither the question nor the chain), and a line said again.
    math_step = step_features("Tom has 3 boxes of 8 pencils.", 2, "3 * 8 = 24, so 24 - 10 = 14\n", (-0.1,),
                              context="He gives away 10.\n3 * 8 = 24\n")
    assert math_step["new_numbers"] == 1.0 and math_step["repeats_a_line"] == 0.0
    assert step_features("q", 2, "3 * 8 = 24\n", (-0.1,), context="3 * 8 = 24\n")["repeats_a_line"] == 1.0


def test_the_classifier_file_round_trips_and_a_bad_one_is_named(tmp_path):
    clf = by_mean_logprob()
    path = tmp_path / "verifier.json"
    path.write_text(json.dumps(clf.to_dict()))
    assert StepClassifier.load(path) == clf
    with pytest.raises(ConfigError, match="no step classifier at"):
        StepClassifier.load(tmp_path / "missing.json")
    path.write_text(json.dumps({**clf.to_dict(), "coef": [1.0, 2.0]}))
    with pytest.raises(ConfigError, match="differ in length"):
        StepClassifier.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a step classifier"):
        StepClassifier.load(path)
