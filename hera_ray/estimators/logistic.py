"""Multinomial logistic regression stored as JSON: DP over the SLM's confidence in its next step.

DP (``dp_input: confidence``) predicts the S-L distance class from what the SLM's next step shows:
its token log-probabilities (summaries), its length and shape and its place in the chain, the
features hera-verify's step classifier reads (:func:`hera_ray.policy.verify.step_features`). On
the Qwen pair's profile that carries more than the request text does: a step the SLM wrote
unsure of itself is where its path leaves the LLM's. Fitted by scikit-learn at training time;
serving needs only this file (no pickle, no scikit-learn).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hera_ray.errors import ConfigError

#: The DP file in its estimator folder.
DP_FILE = "dp.json"


def dp_features(question: str, steps: Sequence[tuple[str, str]], slm_next: str,
                logprobs: Sequence[float] | None) -> dict[str, float]:
    """DP's input at a node: the SLM's next step (``slm_next``, with its token log-probabilities) after
    ``steps`` ((subtask, output) pairs: the chain so far)."""
    from hera_ray.policy.verify import step_features

    context = "".join(output if output.endswith("\n") else output + "\n" for _, output in steps)
    return step_features(question, len(steps), slm_next, logprobs, context)


@dataclass(frozen=True)
class SoftmaxClassifier:
    """Multinomial logistic regression over named features (standardised by ``mean``/``scale``)."""

    labels: tuple[str, ...]
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[tuple[float, ...], ...]  # one row per label
    intercept: tuple[float, ...]
    metrics: Mapping[str, Any]

    def predict_proba(self, feats: Mapping[str, float]) -> dict[str, float]:
        x = [(feats.get(n, 0.0) - mu) / (sd or 1.0) for n, mu, sd in zip(self.features, self.mean, self.scale)]
        z = [b + sum(w * v for w, v in zip(row, x)) for row, b in zip(self.coef, self.intercept)]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = sum(e)
        return {label: v / total for label, v in zip(self.labels, e)}

    def predict(self, feats: Mapping[str, float]) -> str:
        p = self.predict_proba(feats)
        return max(self.labels, key=lambda label: p[label])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "softmax", "labels": list(self.labels), "features": list(self.features),
                "mean": list(self.mean), "scale": list(self.scale), "coef": [list(r) for r in self.coef],
                "intercept": list(self.intercept), "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SoftmaxClassifier":
        if d.get("kind") != "softmax":
            raise ConfigError(f"the classifier is of kind {d.get('kind')!r}; this hera-ray reads 'softmax'")
        n, k = len(d["features"]), len(d["labels"])
        if not (len(d["mean"]) == len(d["scale"]) == n and len(d["coef"]) == len(d["intercept"]) == k
                and all(len(r) == n for r in d["coef"])):
            raise ConfigError("the classifier's labels, features, mean, scale, coef and intercept differ in shape")
        return cls(tuple(map(str, d["labels"])), tuple(d["features"]), tuple(map(float, d["mean"])),
                   tuple(map(float, d["scale"])), tuple(tuple(map(float, r)) for r in d["coef"]),
                   tuple(map(float, d["intercept"])), dict(d.get("metrics", {})))

    @classmethod
    def load(cls, path: Path) -> "SoftmaxClassifier":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"no classifier at {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path} is not a softmax classifier: {e}") from None


def train_softmax(train: Sequence[tuple[Mapping[str, float], str]], labels: Sequence[str], c: float = 1.0,
                  seed: int = 0) -> SoftmaxClassifier:
    """Fit on (features, label) pairs; ``labels`` fixes the output classes and their order (a class
    absent from the data gets a very low intercept, so it is never predicted)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    if not train:
        raise ValueError("no training examples")
    names = tuple(train[0][0])
    x = np.array([[f[n] for n in names] for f, _ in train], dtype=np.float64)
    y = [str(label) for _, label in train]
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    coef = [[0.0] * len(names) for _ in labels]
    intercept = [-30.0] * len(labels)
    present = sorted(set(y), key=list(labels).index)
    if len(present) == 1:  # one class only (a tiny profile): always that one
        intercept[list(labels).index(present[0])] = 0.0
    else:
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit((x - mean) / scale, y)
        rows = model.coef_ if len(present) > 2 else np.vstack([-model.coef_[0] / 2, model.coef_[0] / 2])
        bias = model.intercept_ if len(present) > 2 else np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2])
        for label, row, b in zip(model.classes_, rows, bias):
            i = list(labels).index(label)
            coef[i], intercept[i] = row.tolist(), float(b)
    return SoftmaxClassifier(tuple(labels), names, tuple(mean.tolist()), tuple(scale.tolist()),
                             tuple(tuple(r) for r in coef), tuple(intercept), {})
