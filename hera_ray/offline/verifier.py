"""hera-verify's step classifier, trained on a profile's ``slm_checks``.

Each check is one step of the All-SLM path: the SLM's step with its token log-probabilities, and
whether the LLM, from the same context, wrote a step at least ``match_threshold`` similar (SBERT)
— "the LLM would agree". The classifier (logistic regression over
:func:`hera_ray.policy.verify.step_features`, fitted by scikit-learn, stored as JSON) predicts
that from what the SLM's step alone shows, so that the policy can keep a step without asking the
LLM. Held out: the requests :func:`hera_ray.offline.datasets.is_heldout` picks, as for every
estimator.
"""

from __future__ import annotations

import math
from typing import Any

from hera_ray.offline.datasets import Split
from hera_ray.policy.verify import StepClassifier, ends_line, geo_mean_prob, llm_step_score, step_features


def verifier_examples(records: list[dict[str, Any]]) -> Split:
    """(features, agree, extras) per checked SLM step; ``extras`` has the SLM's confidence and the LLM's step score."""
    split = Split()
    for r in records:
        steps = r["all_slm"]["steps"]
        for check in r.get("slm_checks", ()):
            step = steps[check["index"]]
            if step.get("logprobs") is None:
                continue
            context = "".join(s["output"] for s in steps[: check["index"]])
            feats = step_features(r["question"], check["index"], step["subtask"], step["logprobs"], context)
            extras = {"confidence": geo_mean_prob(step["logprobs"]),
                      "llm_score": llm_step_score(check["llm_logprobs"], check["llm_top_logprobs"],
                                                  ends_line(step["output"])),
                      "llm_argmax_share": argmax_share(check["llm_logprobs"], check["llm_top_logprobs"],
                                                       ends_line(step["output"])),
                      "dataset": r.get("dataset", "")}
            split.add(r["request_id"], (feats, bool(check["agree"]), extras))
    return split


def argmax_share(logprobs: list[float], top_logprobs: list[float] | None, line_end: bool) -> float:
    """The share of the step's tokens that are the LLM's own first choice (speculative decoding's
    acceptance, per token), over the tokens :func:`llm_step_score` reads. An alternative check score,
    compared with it by ``bench/verify_calibration.py``; the policy does not use it."""
    pairs = list(zip(logprobs, top_logprobs or [0.0] * len(logprobs)))
    if line_end and len(pairs) > 1:
        pairs = pairs[:-1]
    return sum(lp >= top - 1e-6 for lp, top in pairs) / len(pairs) if pairs else 0.0


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve (the probability a positive outranks a negative); None with one class."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted((s, i) for i, s in enumerate(scores))
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    pos_ranks = sum(r for r, y in zip(ranks, labels) if y)
    return (pos_ranks - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def train_verifier(split: Split, seed: int = 0, c: float = 1.0) -> StepClassifier:
    """Fit the logistic regression on ``split.train``; its metrics are on ``split.heldout``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    names = tuple(split.train[0][0])
    x = np.array([[f[n] for n in names] for f, _, _ in split.train], dtype=np.float64)
    y = np.array([int(a) for _, a, _ in split.train])
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    if len(set(y.tolist())) < 2:  # one class only (a tiny profile): P(good) is its rate, whatever the step
        rate = min(0.98, max(0.02, float(y.mean())))
        coef, intercept = [0.0] * len(names), math.log(rate / (1 - rate))
    else:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - mean) / scale, y)
        coef, intercept = model.coef_[0].tolist(), float(model.intercept_[0])
    clf = StepClassifier(names, tuple(mean.tolist()), tuple(scale.tolist()), tuple(coef), intercept, {})
    return StepClassifier(clf.features, clf.mean, clf.scale, clf.coef, clf.intercept, evaluate(clf, split))


def evaluate(clf: StepClassifier, split: Split) -> dict[str, Any]:
    """Held-out accuracy (at P(good) 0.5) beside the majority class, and how well each signal ranks
    agreeing steps above the rest (AUC): the classifier, the SLM's confidence alone, the LLM's score."""
    held = split.heldout or split.train
    labels = [a for _, a, _ in held]
    p = [clf.p_good(f) for f, _, _ in held]
    positive = sum(labels) / len(labels)
    train_pos = sum(a for _, a, _ in split.train) / max(1, len(split.train))
    out: dict[str, Any] = {
        "accuracy": sum((q >= 0.5) == a for q, a in zip(p, labels)) / len(labels),
        "majority_baseline": max(positive, 1 - positive),
        "agree_rate_heldout": positive, "agree_rate_train": train_pos,
        "auc": auc(p, labels),
        "confidence_auc": auc([e["confidence"] for _, _, e in held], labels),
        "llm_score_auc": auc([e["llm_score"] for _, _, e in held], labels),
        "heldout_examples": len(held), "train_examples": len(split.train),
        "heldout_is_train": not split.heldout,
    }
    return {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in out.items()}
