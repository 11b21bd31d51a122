"""Continual fine-tuning from live traffic (``hera learn``): the estimators that the runs hera-ray
routed can label retrain on them, are checked on the most recent runs, and replace the serving
set only if those runs do not get worse (the paper retrains every 500 requests, Table 5).

What live traffic labels, from the stored traces (:mod:`hera_ray.store`):

* ``sp_slm``: every step the SLM wrote, kept or rejected, after the context it was given;
* ``sp_llm``: every step the LLM wrote, after its context;
* ``verifier`` (hera-verify's step classifier): the LLM's verdicts on borderline SLM steps, kept
  after its check (good) or rewritten (not), with the SLM's token log-probabilities.

What it cannot label (:data:`OFFLINE_ONLY`) needs what only the profile has: both models' paths
on the same request and the gold answer.

Split: the runs in the order they were made; the most recent ``heldout_share`` are held out, so
the check is on the traffic the new set will meet next. A set is promoted when, on that slice,
no retrained estimator scores below the one it replaces (SP: SBERT-matched next-step accuracy, as
``hera train`` measures it; the classifier: AUC of its P(good) for the LLM's verdict). The new
set is a copy of the current one with the promoted parts replaced, and its manifest's
``history`` records every promotion and refusal with its figures.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from hera_ray.errors import ConfigError
from hera_ray.offline.datasets import Split

#: Estimators live traffic cannot label, and why (what ``hera learn`` reports).
OFFLINE_ONLY = {
    "urc": "its label (the SLM's whole answer right, or the LLM's wrong) needs both models' answers to the same "
           "request and the gold answer; live traffic has one path and no gold",
    "hybridllm": "as URC: it needs both models' answers and the gold answer",
    "routellm": "as URC: it needs both models' answers and the gold answer",
    "dp": "its label (how far the SLM's path stays from the LLM's) needs the LLM's own step where the SLM ran; "
          "live traffic has only the step that ran",
    "sd": "its label (a split that made the request succeed) needs the gold answer",
}
LEARNED = ("sp_slm", "sp_llm", "verifier")


class LearnConfig(BaseSettings):
    """Settings of ``hera learn``."""

    model_config = SettingsConfigDict(env_prefix="HERA_LEARN_", extra="forbid")

    heldout_share: float = Field(0.2, gt=0, lt=1, description="The most recent share of the runs held out to check the new set on.")
    min_examples: int = Field(50, ge=1, description="Training examples an estimator needs from live traffic before it is retrained.")
    max_examples: int = Field(600, ge=1, description="Training examples per generative estimator at most (the most recent).")
    max_eval: int = Field(120, ge=1, description="Held-out examples evaluated per generative estimator at most.")
    epochs: Optional[int] = Field(None, ge=1, description="Epochs over the SP data (default: the serving set's own, train_settings.causal_epochs, else 2).")
    lr: Optional[float] = Field(None, gt=0, description="Learning rate of the SP LoRA (default: the serving set's own, train_settings.causal_lr, else 1e-4).")
    compare_base: bool = Field(False, description="Also score the SP base model without any adapter on the held-out runs (what a set with no trained SP would do).")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    max_len: int = Field(512, ge=32, description="Tokens per SP training example at most.")
    seed: int = Field(0, description="Initialisation seed.")
    only: str = Field("", description="Comma-separated estimators to retrain (default: sp_slm,sp_llm,verifier).")

    def wanted(self) -> list[str]:
        chosen = [s.strip() for s in self.only.split(",") if s.strip()] or list(LEARNED)
        unknown = [s for s in chosen if s not in LEARNED]
        if unknown:
            why = "; ".join(f"{n}: {OFFLINE_ONLY[n]}" for n in unknown if n in OFFLINE_ONLY)
            raise ConfigError(f"cannot learn {', '.join(unknown)} from live traffic (learnable: {', '.join(LEARNED)})"
                              + (f". {why}" if why else ""))
        return chosen


@dataclass
class LiveExamples:
    """Examples per estimator, each as (run time, question, example), oldest first."""

    sp_slm: list[tuple[float, str, tuple]] = field(default_factory=list)
    sp_llm: list[tuple[float, str, tuple]] = field(default_factory=list)
    verifier: list[tuple[float, str, tuple]] = field(default_factory=list)
    runs: int = 0


def live_examples(runs: Iterable[dict[str, Any]], sp_format: str) -> LiveExamples:
    """What the stored runs (rows with ``run``) label. Runs that failed, and step-mode calls (their
    context is the caller's conversation, not a chain), are left out."""
    from hera_ray.estimators.prompts import sp_request
    from hera_ray.policy.verify import geo_mean_prob, step_features

    out = LiveExamples()
    for row in runs:
        run = row.get("run") or {}
        if row.get("status") != "ok" or str(row.get("policy", "")).startswith("step:"):
            continue
        out.runs += 1
        question, when = run.get("question", ""), float(row.get("created_at", 0.0))
        history: list[tuple[str, str]] = []
        context = ""
        for t in run.get("trace") or []:
            if t.get("discarded"):
                continue
            messages, cont = sp_request(sp_format, question, history)

            def sp(text: str) -> tuple:
                target = text.rstrip("\n").rstrip() if sp_format == "chain" else text
                return (messages, target, cont, "\n" if sp_format == "chain" else None)

            if t.get("subtask", "").strip():
                (out.sp_slm if t.get("placement") == "edge" else out.sp_llm).append((when, question, sp(t["subtask"])))
            rejected = (t.get("rejected_output") or "").strip()
            if rejected:  # the SLM's step the LLM rewrote: the SLM wrote it after this context too
                out.sp_slm.append((when, question, sp(rejected)))
            scores = t.get("scores") or {}
            slm_lps = t.get("slm_logprobs") or []
            if slm_lps and "llm_score" in scores and t.get("stage") in ("llm-check", "llm-rewrite"):
                slm_text = t["output"] if t["stage"] == "llm-check" else t.get("rejected_output", "")
                feats = step_features(question, int(t.get("index", len(history))), slm_text.strip(), slm_lps, context)
                extras = {"confidence": scores.get("confidence", geo_mean_prob(slm_lps)), "llm_score": scores["llm_score"]}
                out.verifier.append((when, question, (feats, t["stage"] == "llm-check", extras)))
            history.append((t.get("subtask", ""), t.get("output", "")))
            context += t.get("output", "")  # as the policy builds it when it serves (verify.py)
    return out


def _split(examples: list[tuple[float, str, tuple]], cut: float) -> Split:
    """Runs made from ``cut`` on are held out; the older ones train, less any run of a question
    that is also held out (the same request asked again must not be seen on both sides)."""
    held_questions = {q for when, q, _ in examples if when >= cut}
    split = Split()
    for when, q, ex in examples:
        if when >= cut:
            split.heldout.append(ex)
        elif q not in held_questions:
            split.train.append(ex)
    return split


def sp_training(config: LearnConfig, manifest: dict[str, Any]) -> tuple[int, float]:
    """Epochs and learning rate of the SP LoRA: as given, else the way the serving set's SP was
    trained (its manifest's ``train_settings``), else 2 epochs at 1e-4."""
    trained_with = manifest.get("train_settings") or {}
    return (config.epochs or int(trained_with.get("causal_epochs") or 2),
            config.lr or float(trained_with.get("causal_lr") or 1e-4))


def learn(store, estimators: Path | None, out_root: Path, config: LearnConfig | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Retrain what live traffic labels on the runs in ``store``; write a new set under
    ``out_root`` if any part is promoted. Returns ``{"set": path or None, "history": entry}``."""
    from hera_ray.estimators.similarity import SbertSimilarity
    from hera_ray.estimators.trained import BUNDLED_ESTIMATORS, MANIFEST
    from hera_ray.models import resolve_model
    from hera_ray.offline.train import _generative_accuracy, _sample  # the measure hera train reports
    from hera_ray.policy.verify import VERIFIER_FILE, StepClassifier

    config = config or LearnConfig()
    wanted = config.wanted()
    current = Path(estimators).expanduser() if estimators else BUNDLED_ESTIMATORS
    manifest_path = current / MANIFEST
    if not manifest_path.exists():
        raise ConfigError(f"{current} is not a trained estimator set (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    sp_format = manifest.get("sp_format", "compact")
    epochs, lr = sp_training(config, manifest)
    threshold = float(manifest.get("match_threshold", 0.7))

    rows = list(store.iter_runs())
    times = sorted(float(r["created_at"]) for r in rows
                   if r.get("status") == "ok" and not str(r.get("policy", "")).startswith("step:"))
    if len(times) < 2:
        raise ConfigError(f"the store holds {len(times)} finished run(s): too few to learn from and check on")
    cut = times[min(len(times) - 1, int(len(times) * (1 - config.heldout_share)))]
    live = live_examples(rows, sp_format)
    log(f"{live.runs} finished run(s); the runs from {datetime.fromtimestamp(cut).isoformat(timespec='seconds')} on "
        f"are held out ({sum(t >= cut for t in times)})")

    entry: dict[str, Any] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from": str(current),
                             "runs": live.runs, "heldout_runs": sum(t >= cut for t in times), "estimators": {},
                             "offline_only": OFFLINE_ONLY}
    import uuid

    staged = Path(out_root).expanduser().resolve() / f"learned-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    scratch = staged.with_name(staged.name + ".parts")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    promoted: dict[str, dict[str, Any]] = {}
    sbert = None

    for name in wanted:
        split = _split(getattr(live, name), cut)
        result: dict[str, Any] = {"train_examples": len(split.train), "heldout_examples": len(split.heldout)}
        entry["estimators"][name] = result
        if len(split.train) < config.min_examples or not split.heldout:
            result.update(promoted=False, reason=f"{len(split.train)} training / {len(split.heldout)} held-out example(s) "
                                                  f"from live traffic; {config.min_examples} training and 1 held-out needed")
            log(f"{name}: skipped ({result['reason']})")
            continue
        if name == "verifier":
            from hera_ray.offline.verifier import evaluate, train_verifier

            labels = {a for _, a, _ in split.train}
            if len(labels) < 2:
                result.update(promoted=False, reason="the LLM's verdicts in the training runs are all one way")
                log(f"{name}: skipped ({result['reason']})")
                continue
            if len({a for _, a, _ in split.heldout}) < 2:
                result.update(promoted=False, reason="the LLM's verdicts in the held-out runs are all one way: no AUC to compare")
                log(f"{name}: skipped ({result['reason']})")
                continue
            new = train_verifier(split, seed=config.seed)
            after = new.metrics
            old_path = current / VERIFIER_FILE
            before = evaluate(StepClassifier.from_dict(json.loads(old_path.read_text())), split) if old_path.exists() else None
            result.update(metric="auc", before=None if before is None else before["auc"], after=after["auc"],
                          accuracy_before=None if before is None else before["accuracy"], accuracy_after=after["accuracy"])
            better = after["auc"] is not None and (before is None or before["auc"] is None or after["auc"] >= before["auc"])
            if better:
                (scratch / "verifier").mkdir(exist_ok=True)
                (scratch / "verifier" / VERIFIER_FILE).write_text(json.dumps(new.to_dict(), indent=2))
                promoted[name] = {"kind": "logistic", "path": f"verifier/{VERIFIER_FILE}", "labels": ["disagree", "agree"],
                                  "train_examples": len(split.train), "heldout_examples": len(split.heldout),
                                  "metrics": dict(after)}
        else:
            from hera_ray.estimators.generative import LoraGenerator
            from hera_ray.offline.causal import train_causal_lora

            old = manifest["estimators"].get(name) or {}
            base = old.get("base") or manifest.get("train_settings", {}).get("causal_base") or "qwen2.5-coder-0.5b"
            train = split.train[-config.max_examples:]
            heldout = _sample(split.heldout, config.max_eval, config.seed)
            result.update(train_examples=len(train), heldout_examples=len(heldout), heldout_pool=len(split.heldout))
            log(f"{name}: {len(train)} training / {len(heldout)} held-out live example(s)")
            folder = scratch / name
            stats = train_causal_lora(train, resolve_model(base).path, folder, r=config.lora_r, alpha=2 * config.lora_r,
                                      epochs=epochs, lr=lr, max_len=config.max_len, seed=config.seed)
            if sbert is None:
                sbert = SbertSimilarity(manifest.get("similarity_model", "minilm-l6"))
            old_adapter = current / old["path"] if old.get("path") else None
            gens = {"before": LoraGenerator(base, old_adapter), "after": LoraGenerator(base, folder / "adapter.gguf")}
            if config.compare_base and old_adapter is not None:
                gens["base"] = LoraGenerator(base, None)
            try:
                scores = {k: _generative_accuracy(g, heldout, sbert, threshold, name) for k, g in gens.items()}
            finally:
                for g in gens.values():
                    g.close()
            result.update(metric="accuracy", before=scores["before"], after=scores["after"], train_s=stats.get("train_s"),
                          epochs=epochs, lr=lr, base=scores.get("base", scores["before"] if old_adapter is None else None))
            better = scores["after"] >= scores["before"]
            if better:
                promoted[name] = {**old, "kind": "causal", "base": base, "path": f"{name}/adapter.gguf",
                                  "train_examples": len(train), "heldout_examples": len(heldout),
                                  "metrics": {"accuracy": scores["after"], "live_before": scores["before"]},
                                  "train_s": stats.get("train_s")}
        result["promoted"] = better
        log(f"{name}: {result['metric']} on the held-out runs {_fmt(result['before'])} -> {_fmt(result['after'])}: "
            + ("promoted" if better else "refused (worse than the serving one)"))

    if not promoted:
        shutil.rmtree(scratch, ignore_errors=True)
        entry["set"] = None
        log("nothing promoted: the serving set stays")
        return {"set": None, "history": entry}
    shutil.copytree(current, staged)
    for name in promoted:
        shutil.rmtree(staged / name, ignore_errors=True)
        shutil.copytree(scratch / name, staged / name)
    if "verifier" in promoted:  # where hera-verify looks for it in a set
        shutil.copyfile(staged / "verifier" / VERIFIER_FILE, staged / VERIFIER_FILE)
    shutil.rmtree(scratch, ignore_errors=True)
    manifest["estimators"].update(promoted)
    entry["set"] = str(staged)
    manifest["history"] = [*manifest.get("history", []), entry]
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"new set: {staged} ({', '.join(promoted)} promoted)")
    return {"set": str(staged), "history": entry}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
