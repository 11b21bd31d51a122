"""The step classifier's training on profile records: examples from the LLM's checks of the SLM's
path, a logistic regression that learns what the SLM's confidence says, held out by request."""

from __future__ import annotations

import math
import random

import pytest

from hera_ray.offline.verifier import argmax_share, auc, train_verifier, verifier_examples
from hera_ray.policy.verify import StepClassifier, step_features


def record(i: int, rng: random.Random) -> dict:
    steps, checks = [], []
    for k in range(8):
        confident = rng.random() < 0.6
        lps = [rng.uniform(-0.05, 0.0) if confident else rng.uniform(-2.5, -0.3) for _ in range(6)]
        steps.append({"subtask": f"step {k}\n", "output": f"step {k}\n", "logprobs": lps})
        agree = confident if rng.random() < 0.9 else not confident  # 10% label noise
        checks.append({"index": k, "llm_logprobs": [-0.1] * 6, "llm_top_logprobs": [-0.1] * 6,
                       "similarity": 0.9 if agree else 0.2, "agree": agree})
    steps.append({"subtask": "\n", "output": "\n", "logprobs": None})  # no log-probabilities: not an example
    return {"request_id": f"gsm8k-{i}", "question": "q", "dataset": "gsm8k",
            "all_slm": {"steps": steps}, "slm_checks": checks}


def test_the_classifier_learns_what_the_slms_confidence_says_and_beats_the_majority():
    rng = random.Random(0)
    split = verifier_examples([record(i, rng) for i in range(60)])
    assert split.heldout and split.train and len(split.train) + len(split.heldout) == 60 * 8
    clf = train_verifier(split)
    m = clf.metrics
    assert m["accuracy"] >= m["majority_baseline"] + 0.15 and m["auc"] > 0.8 and m["confidence_auc"] > 0.8
    assert m["heldout_examples"] == len(split.heldout) and not m["heldout_is_train"]
    confident = step_features("q", 3, "step 3\n", [-0.02] * 6)
    unsure = step_features("q", 3, "step 3\n", [-1.4] * 6)
    assert clf.p_good(confident) > 0.8 > 0.2 > clf.p_good(unsure)
    # What it stores is what the policy loads.
    assert StepClassifier.from_dict(clf.to_dict()) == clf


def test_a_profile_with_one_class_gives_a_constant_classifier():
    rng = random.Random(1)
    records = [record(i, rng) for i in range(10)]
    for r in records:
        for c in r["slm_checks"]:
            c["agree"] = True
    clf = train_verifier(verifier_examples(records))
    assert clf.p_good({"mean_logprob": -3.0}) == pytest.approx(0.98) == clf.p_good({"mean_logprob": 0.0})
    assert clf.metrics["accuracy"] == clf.metrics["majority_baseline"] == 1.0


def test_auc_counts_ties_as_half():
    assert auc([0.1, 0.9], [False, True]) == 1.0
    assert auc([0.5, 0.5], [False, True]) == 0.5
    assert auc([0.2, 0.3], [True, True]) is None
    assert math.isclose(auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]), 0.75)


def test_on_the_committed_profile_the_classifier_beats_the_majority_and_the_slms_confidence():
    """The real profile of the bundled pair (data/profiles: GSM8K, MBPP, ARC-Challenge), held out by
    request as `hera train` does: the classifier ranks agreeing steps above the rest better than
    chance and than the SLM's confidence alone, and its accuracy is at least the majority class's."""
    from pathlib import Path

    from hera_ray.offline.train import read_profiles

    profiles = Path(__file__).resolve().parent.parent / "data" / "profiles"
    records, _, configs = read_profiles(profiles)
    assert len(records) >= 300 and set(configs) == {"gsm8k", "mbpp", "arc_challenge"}
    split = verifier_examples(records)
    m = train_verifier(split).metrics
    assert m["heldout_examples"] >= 200 and not m["heldout_is_train"]
    assert m["auc"] >= 0.75 and m["auc"] > m["confidence_auc"], m
    assert m["accuracy"] >= m["majority_baseline"] + 0.03, m


def test_argmax_share_counts_the_tokens_the_llm_would_have_chosen_leaving_out_a_line_end():
    lps, tops = [-0.1, -2.0, -0.3, -1.5], [-0.1, -0.2, -0.3, -0.1]  # tokens 0 and 2 are the LLM's first choice
    assert argmax_share(lps, tops, line_end=False) == 0.5
    assert argmax_share(lps, tops, line_end=True) == pytest.approx(2 / 3)  # the cut newline token is not read
    assert argmax_share([-0.4], [-0.1], line_end=True) == 0.0  # a one-token step is read whole
    assert argmax_share([], [], line_end=False) == 0.0
    ex = verifier_examples([record(0, random.Random(1))]).train + verifier_examples([record(0, random.Random(1))]).heldout
    assert {e["llm_argmax_share"] for _, _, e in ex} == {1.0}  # record(): the LLM scores every token as its top
