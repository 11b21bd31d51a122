"""``hera-verify``: the SLM writes each step first; cheap evidence keeps it; the LLM checks the rest.

Beyond the HERA paper, in the manner of SpecReason, RSD, SMART and STEER: HERA *predicts* where a
step should run before any model writes it. Here the edge SLM always writes the step first (it is
nearly free), and the question becomes whether to keep what it wrote:

1. **Confidence** (stage ``confidence``): the SLM's own token probabilities, which the edge
   returns with the step. A step whose geometric-mean token probability is at least
   ``confidence_keep`` is kept at once: no model, no classifier.
2. **Classifier** (stage ``classifier``): a logistic regression trained on the profile
   (``hera train``'s ``verifier``) reads the step's token log-probabilities, its shape and its
   place in the chain, and gives P(good): the probability that the LLM, from the same context,
   would have written the same step. At least ``keep`` (the knob): kept. Without a trained
   classifier the confidence itself stands in for P(good).
3. **LLM check** (stage ``verify``, then ``llm-check`` or ``llm-rewrite``): a borderline step is
   sent to the cloud LLM to be *scored*, not written: one prefill of the step's tokens over the
   LLM's cached prefix (as SpecReason and RSD do), billed as input tokens. The LLM's step score is
   the geometric mean, over the step's tokens, of p_LLM(token) / p_LLM(its own top token): 1 where
   the LLM would have written exactly this step. At least ``llm_accept`` (by default the knob
   itself: one bar for both kinds of evidence): kept (``llm-check``).
   Else the LLM writes the step itself (``llm-rewrite``) from its cached prefix.
   Below ``reject_below`` P(good), the check is skipped and the LLM rewrites at once.
   With ``check_batch`` above 1 the SLM writes on while up to that many borderline steps wait, and
   the LLM scores them all in one prefill (the way speculative decoding verifies a draft's tokens,
   at step level); each is then decided as above, in order, and the first one rejected is rewritten
   (the steps written after it are discarded). The decisions are the same; the LLM re-reads the
   prompt once per batch instead of once per step. A step under ``batch_above`` P(good), likely to
   be rejected, closes its batch: nothing is written after it to be discarded. With
   ``check_writes`` (the default) the check's own call writes in place of the first step it scores
   under ``llm_accept``: the LLM reads the prompt once for the check and the rewrite.

A blank line (a paragraph break) is kept as it is (stage ``blank``); an empty step (the SLM wrote
nothing) is the LLM's to write.

``keep`` is the one knob (``hera-verify@0.8``): the bar a step must clear, whichever evidence is
at hand. Raise it and more steps are checked by the LLM and more of those are rewritten (quality
up, cost up); lower it and more steps stay on the SLM unchecked.

Each decision's ``scores`` say what decided: ``slm_confidence``, ``p_good``, ``keep``,
``llm_score``, ``llm_accept``. Pure code: the agent runs the models (:mod:`hera_ray.agent.loop`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from hera_ray.errors import ConfigError
from hera_ray.generation import segment_score
from hera_ray.policy.base import SPECULATE, Decision, Placement, Policy, SubtaskContext

#: A decision's stage that means "score the SLM's step on the LLM (one prefill), then ask again
#: with the LLM's log-probabilities" (``SubtaskContext.llm_logprobs``).
VERIFY = "verify"

#: The step classifier's file in an estimator folder (``hera train`` writes it).
VERIFIER_FILE = "verifier.json"

#: Stages of hera-verify's final decisions.
KEPT_BY_CONFIDENCE, KEPT_BY_CLASSIFIER, KEPT_BY_LLM, REWRITTEN = "confidence", "classifier", "llm-check", "llm-rewrite"
#: A step that is a blank line (the chain's paragraph break) is kept as it is.
KEPT_BLANK = "blank"


@dataclass(frozen=True)
class VerifyConfig:
    """The policy's settings as pure code. These defaults are the policy's own; the runtime builds it
    from ``VerifySettings`` (``hera_ray/config.py``: keep 0.95, check_batch 3), the calibrated ones."""

    #: The knob: P(good) at which the SLM's step is kept without the LLM.
    keep: float = 0.7
    #: SLM geometric-mean token probability at which a step is kept outright (above 1: never).
    confidence_keep: float = 0.97
    #: LLM step score at which the LLM keeps the SLM's step; None: the knob, ``keep`` (one bar for
    #: every kind of evidence: P(good) from the classifier, the LLM's score from the LLM).
    llm_accept: float | None = None
    #: P(good) under which the LLM rewrites without checking (0: always check first).
    reject_below: float = 0.0
    #: Borderline steps scored in one LLM prefill at most (``Decision.check_batch``; 1: each at once).
    check_batch: int = 1
    #: P(good) under which a borderline step closes its batch: it is checked at once, with the steps
    #: waiting before it (the LLM is likely to reject it, and the SLM steps written after a rejected
    #: step are discarded). 0: every borderline step may wait.
    batch_above: float = 0.0
    #: The check writes in place of the step it rejects, in the same call (``Decision.rewrite_below``):
    #: the prompt is read once for both.
    check_writes: bool = True


def geo_mean_prob(logprobs: Sequence[float] | None) -> float:
    """exp(mean log-probability): the step's per-token probability; 0 for a step without tokens."""
    if not logprobs:
        return 0.0
    return math.exp(sum(logprobs) / len(logprobs))


#: How much the LLM stands behind a step it scored (1.0: it would have written exactly these
#: tokens); the engines use the same rule for a check that may write (``rewrite_below``).
llm_step_score = segment_score


def ends_line(step: str | None) -> bool:
    """The step, as the LLM's check scores it (:func:`hera_ray.agent.steps.checked_text`), ends with a newline."""
    from hera_ray.agent.steps import checked_text

    return bool(step) and checked_text(step).endswith("\n")


_NUMBER = re.compile(r"\d")
_CODE = re.compile(r"^\s*(def |return |for |if |while |import |class |[a-zA-Z_][\w.\[\]]* *[-+*/]?= )")


_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


def step_features(question: str, index: int, step: str, logprobs: Sequence[float] | None,
                  context: str = "") -> dict[str, float]:
    """What the classifier reads of one SLM step: its token log-probabilities (summaries), its
    length and shape, its place in the chain, and what it adds to the context (``context``: the
    chain before it): numbers that appear in neither the question nor the chain are results the
    step computed, where a small model's slips are. Cheap: no model."""
    lps = list(logprobs or ())
    n = len(lps)
    probs = [math.exp(x) for x in lps]
    text = step.strip()
    known = set(_NUMBERS.findall(question)) | set(_NUMBERS.findall(context))
    numbers = _NUMBERS.findall(text)
    previous = {line.strip() for line in context.splitlines() if line.strip()}
    return {
        "mean_logprob": sum(lps) / n if n else 0.0,
        "min_logprob": min(lps) if n else 0.0,
        "first_logprob": lps[0] if n else 0.0,
        "last_logprob": lps[-1] if n else 0.0,
        "frac_below_0.5": sum(p < 0.5 for p in probs) / n if n else 0.0,
        "frac_below_0.9": sum(p < 0.9 for p in probs) / n if n else 0.0,
        "sum_logprob": sum(lps),
        "log_tokens": math.log1p(n),
        "log_chars": math.log1p(len(text)),
        "position": math.log1p(index),
        "blank": float(not text),
        "has_number": float(bool(_NUMBER.search(text))),
        "has_equals": float("=" in text),
        "answer_line": float(text.lower().startswith(("answer", "the answer", "final answer", "####"))),
        "code_line": float(bool(_CODE.match(step))),
        "fence": float(text.startswith("```")),
        "question_code": float("python" in question.lower() or "def " in question),
        "new_numbers": float(sum(x not in known for x in numbers)),
        "repeats_a_line": float(bool(text) and text in previous),
    }


@dataclass(frozen=True)
class StepClassifier:
    """Logistic regression over :func:`step_features`, stored as JSON (no pickle, no sklearn at serving)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    metrics: Mapping[str, Any]

    def p_good(self, feats: Mapping[str, float]) -> float:
        z = self.intercept
        for name, mu, sd, w in zip(self.features, self.mean, self.scale, self.coef):
            z += w * (feats.get(name, 0.0) - mu) / (sd or 1.0)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "logistic", "features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept, "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepClassifier":
        if d.get("kind") != "logistic":
            raise ConfigError(f"the step classifier is of kind {d.get('kind')!r}; this hera-ray reads 'logistic'")
        n = len(d["features"])
        if not (len(d["mean"]) == len(d["scale"]) == len(d["coef"]) == n):
            raise ConfigError("the step classifier's features, mean, scale and coef differ in length")
        return cls(tuple(d["features"]), tuple(map(float, d["mean"])), tuple(map(float, d["scale"])),
                   tuple(map(float, d["coef"])), float(d["intercept"]), dict(d.get("metrics", {})))

    @classmethod
    def load(cls, path: Path) -> "StepClassifier":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"no step classifier at {path}: train one (`hera train --only verifier`)") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path} is not a step classifier: {e}") from None


class VerifyPolicy(Policy):
    name = "hera-verify"
    description = ("The SLM writes each step; kept by its confidence or a trained classifier, else the LLM scores it "
                   "in one prefill and rewrites it if it disagrees.")
    knob = "keep"

    def __init__(self, config: VerifyConfig | None = None, classifier: StepClassifier | None = None):
        self.config = config or VerifyConfig()
        self.classifier = classifier

    @property
    def llm_accept(self) -> float:
        c = self.config
        return c.keep if c.llm_accept is None else c.llm_accept

    def _at(self, value: float) -> "VerifyPolicy":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {value}")
        other = VerifyPolicy(replace(self.config, keep=value), self.classifier)
        other.description = self.description
        return other

    async def decide(self, ctx: SubtaskContext) -> Decision:
        c = self.config
        if ctx.slm_candidate is None:  # the SLM writes first, and says how sure it was of each token
            return Decision(Placement.EDGE, SPECULATE, {}, logprobs=True)
        conf = geo_mean_prob(ctx.slm_logprobs)
        scores: dict[str, float] = {"slm_confidence": conf, "keep": c.keep}
        if ctx.llm_logprobs is not None:  # the LLM scored the step: its word decides
            score = llm_step_score(ctx.llm_logprobs, ctx.llm_top_logprobs, ends_line(ctx.slm_candidate))
            scores.update(llm_score=score, llm_accept=self.llm_accept)
            if score >= self.llm_accept:
                return Decision(Placement.EDGE, KEPT_BY_LLM, scores)
            return Decision(Placement.CLOUD, REWRITTEN, scores)
        if not ctx.slm_candidate:  # the SLM wrote nothing: the LLM writes the step
            return Decision(Placement.CLOUD, REWRITTEN, scores)
        if not ctx.slm_candidate.strip():  # a blank line between paragraphs: nothing to check
            return Decision(Placement.EDGE, KEPT_BLANK, scores)
        if conf >= c.confidence_keep:
            return Decision(Placement.EDGE, KEPT_BY_CONFIDENCE, scores)
        if self.classifier is not None:
            context = "".join(h.output for h in ctx.history)
            p = self.classifier.p_good(step_features(ctx.question, ctx.index, ctx.slm_candidate, ctx.slm_logprobs, context))
        else:
            p = conf
        scores["p_good"] = p
        if p >= c.keep:
            return Decision(Placement.EDGE, KEPT_BY_CLASSIFIER if self.classifier is not None else KEPT_BY_CONFIDENCE, scores)
        if p < c.reject_below:
            return Decision(Placement.CLOUD, REWRITTEN, scores)
        return Decision(Placement.CLOUD, VERIFY, scores, check_batch=c.check_batch if p >= c.batch_above else 1,
                        rewrite_below=self.llm_accept if c.check_writes else 0.0)
