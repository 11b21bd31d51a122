"""``hera train``: build each estimator's data set from a profile, fine-tune it with LoRA, measure it.

* URC, HybridLLM, RouteLLM, DP: LoRA + a classification head on the MiniLM encoder (``offline/encoders.py``).
* SP_SLM, SP_LLM, SD: LoRA on the SLM itself (SmolLM2-135M, loaded from its GGUF by transformers;
  ``offline/causal.py``), exported as llama.cpp adapters, because at serving time they run in
  llama.cpp beside the edge SLM. The SLM is the base because it is the smallest causal LM here
  that already writes this task's steps, and because SP_SLM then starts out as the model it
  imitates (SP_LLM is the real estimation problem: a 135M model guessing a 1.5B model's step).

Held-out accuracy, on requests no estimator trained on:

* URC, HybridLLM, DP: exact class accuracy (with the majority-class baseline beside it).
* SP_SLM, SP_LLM: a prediction counts as right when its SBERT similarity to the subtask the model
  actually wrote is >= ``match_threshold`` (0.7): the test the policy's SSE stage makes.
* CD: does DP's distance say "converges within max_distance" exactly when the profile's SLM path did?
* SD: the joined sub-subtasks are >= 0.7 similar to the SLM's actual finer steps.

The output folder gets one sub-folder per estimator and ``manifest.json`` (base models, the
profile's data hash, metrics, paper figures). An estimator whose folder already holds metrics for
the same data hash and settings is not trained again: an interrupted run resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hera_ray.errors import ConfigError
from hera_ray.estimators.prompts import (DP_INPUTS, SD_MAX_TOKENS, SP_FORMATS, SP_MAX_TOKENS, clean_prediction, distance_labels,
                                         parse_parts, sp_target)
from hera_ray.estimators.trained import MANIFEST
from hera_ray.offline import datasets as ds
from hera_ray.offline.profile import CONFIG_FILE, PROFILE_FILE, ProfileConfig, read_profile

#: Held-out accuracy reported by the revised HERA paper (Table 5, without continual fine-tuning).
PAPER_ACCURACY = {"urc": 77.9, "sp_slm": 76.1, "sp_llm": 75.1, "dp": 76.2, "cd": 75.8}


class TrainConfig(BaseSettings):
    """How the estimators are fine-tuned."""

    model_config = SettingsConfigDict(env_prefix="HERA_TRAIN_", extra="forbid")

    encoder_base: str = Field("minilm-l6", description="Encoder for URC, HybridLLM and DP (bundled name or folder).")
    causal_base: str = Field("qwen2.5-coder-0.5b", description="Causal LM for SP and SD (bundled name or GGUF path): by default the edge SLM itself.")
    sp_format: str = Field("chain", description="SP's prompt: 'chain' (the agent's own step format: the steps so far as an open assistant message, continued to the end of the line) or 'compact' (the paper's: a compact rendering of the task and steps).")
    dp_input: str = Field("confidence", description="DP's input: 'context' (the paper's: the request and the subtasks so far) or 'context+slm' (and the SLM's next subtask, which HERA has predicted by the time it asks DP), both read by a LoRA encoder; or 'confidence' (what the SLM's next step shows of itself: its token log-probabilities, length, shape and place), read by a logistic regression.")
    base_only: str = Field("sp_slm", description="Comma-separated generative estimators served as the base model itself, with no adapter (SP_SLM: the edge SLM predicts its own next step by writing it).")
    encoder_epochs: int = Field(10, ge=1, le=100, description="Epochs over the URC / HybridLLM / DP data.")
    causal_epochs: int = Field(1, ge=1, le=20, description="Epochs over the SP / SD data.")
    encoder_lr: float = Field(2e-3, gt=0, description="Learning rate of the encoder LoRA.")
    causal_lr: float = Field(1e-3, gt=0, description="Learning rate of the causal LoRA.")
    lora_r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    max_examples: int = Field(400, ge=1, description="Training examples per generative estimator at most (sampled).")
    max_eval: int = Field(120, ge=1, description="Held-out examples evaluated per generative estimator at most.")
    max_len: int = Field(512, ge=64, le=4096, description="Tokens per causal training example at most.")
    cv_folds: int = Field(5, ge=0, le=20, description="URC / HybridLLM: also report k-fold cross-validated accuracy over all requests (0: off); their held-out set is small.")
    seed: int = Field(0, description="Sampling and initialisation seed.")
    only: str = Field("", description="Comma-separated estimators to train (default: all).")
    unweighted: str = Field("", description="Comma-separated classifiers (urc, hybridllm, routellm, dp) trained with plain cross-entropy instead of class weights: they then aim at raw accuracy, and lean to the majority class.")

    def unweighted_set(self) -> set[str]:
        chosen = {s.strip() for s in self.unweighted.split(",") if s.strip()}
        unknown = chosen - {"urc", "hybridllm", "routellm", "dp"}
        if unknown:
            raise ConfigError(f"--unweighted: {', '.join(sorted(unknown))} is not a classifier (urc, hybridllm, routellm, dp)")
        return chosen

    @field_validator("sp_format", "dp_input")
    @classmethod
    def _known_choice(cls, v: str, info) -> str:
        choices = {"sp_format": SP_FORMATS, "dp_input": DP_INPUTS}[info.field_name]
        if v not in choices:
            raise ValueError(f"{info.field_name} must be one of {', '.join(choices)}, got {v!r}")
        return v

    def untrained(self) -> set[str]:
        return {s.strip() for s in self.base_only.split(",") if s.strip()}

    def wanted(self) -> list[str]:
        all_ = ["urc", "hybridllm", "routellm", "dp", "verifier", "sp_slm", "sp_llm", "sd"]
        chosen = [s.strip() for s in self.only.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(all_))
        if unknown:
            raise ConfigError(f"unknown estimator(s) {unknown}: choose from {', '.join(all_)}")
        return chosen or all_


def data_hash(records: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r["request_id"]):
        h.update(json.dumps(r, sort_keys=True).encode())
    return h.hexdigest()


def _sample(items: list[Any], limit: int, seed: int) -> list[Any]:
    if len(items) <= limit:
        return list(items)
    return random.Random(seed).sample(items, limit)


def _done(folder: Path, key: str) -> dict[str, Any] | None:
    path = folder / "metrics.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.pop("key", None) == key:
            return stored
    return None


def _save_metrics(folder: Path, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"key": key, **entry}, indent=2))
    return entry


def profile_folders(path: Path) -> list[Path]:
    """``path`` itself if it is a profile run folder, else its sub-folders that are (one per data set)."""
    path = Path(path)
    if (path / PROFILE_FILE).exists() or not path.is_dir():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / PROFILE_FILE).exists())
    return found or [path]


def read_profiles(path: Path) -> tuple[list[dict[str, Any]], ProfileConfig, dict[str, ProfileConfig]]:
    """Every finished request under ``path`` (one run folder, or a folder of them), the settings they
    share (the first folder's), and each folder's settings by data set. Folders whose
    ``match_threshold`` or ``max_distance`` differ are refused: their labels would mean different things."""
    records: list[dict[str, Any]] = []
    configs: dict[str, ProfileConfig] = {}
    for folder in profile_folders(path):
        cfg_path = folder / CONFIG_FILE
        cfg = ProfileConfig.model_validate_json(cfg_path.read_text()) if cfg_path.exists() else ProfileConfig()
        records += read_profile(folder)
        configs[cfg.dataset] = cfg
    first = next(iter(configs.values()))
    for name, cfg in configs.items():
        if (cfg.match_threshold, cfg.max_distance) != (first.match_threshold, first.max_distance):
            raise ConfigError(f"the profiles under {path} disagree: {name} has match_threshold {cfg.match_threshold} and "
                              f"max_distance {cfg.max_distance}, {first.dataset} {first.match_threshold} and "
                              f"{first.max_distance}; profile them with the same settings")
    return records, first, configs


def train_all(profile_dir: Path, out: Path, config: TrainConfig | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every estimator from ``profile_dir`` (a run folder, or a folder of them) into ``out``;
    write and return the manifest."""
    from hera_ray.estimators.similarity import SbertSimilarity
    from hera_ray.models import resolve_model

    config = config or TrainConfig()
    config.wanted()  # an unknown --only name fails before any work
    config.unweighted_set()
    records, pcfg, pcfgs = read_profiles(profile_dir)
    if not records:
        raise ConfigError(f"the profile at {profile_dir} holds no finished request yet")
    out.mkdir(parents=True, exist_ok=True)
    dhash = data_hash(records)
    heldout_requests = sum(ds.is_heldout(r["request_id"]) for r in records)
    log(f"{len(records)} profiled request(s) ({heldout_requests} held out), data sha256 {dhash[:12]}")
    estimators: dict[str, dict[str, Any]] = {}
    # Each estimator's key holds the settings it uses: a DP-only or SP-only setting retrains that one alone.
    only_for = {"dp_input": {"dp"}, "sp_format": {"sp_slm", "sp_llm"}, "base_only": {"sp_slm", "sp_llm", "sd"}}

    def settings_key(name: str) -> str:
        # "unweighted" counts only for the classifiers it names (an older folder's keys stay valid).
        skip = {"only"} | {k for k, users in only_for.items() if name not in users}
        return config.model_dump_json(exclude=skip | ({"unweighted"} if name not in config.unweighted_set() else set()))

    @functools.cache
    def sbert():  # loaded on first use: a resumed run may never need it
        return SbertSimilarity(config.encoder_base)

    def train_one(name: str, split: ds.Split, fit_entry: Callable[[Path], dict[str, Any]]) -> None:
        """Reuse ``name``'s metrics if its folder has them for this data and these settings, else train it."""
        if name not in config.wanted():
            return
        folder = out / name
        key = hashlib.sha256(f"{name}:{dhash}:{settings_key(name)}:{pcfg.match_threshold}".encode()).hexdigest()[:16]
        entry = _done(folder, key)
        if entry is None:
            if not split.train:
                log(f"{name}: no training examples; skipped")
                return
            shutil.rmtree(folder, ignore_errors=True)
            entry = _save_metrics(folder, key, fit_entry(folder))
        estimators[name] = entry

    # -- encoders: URC, HybridLLM, DP (CD is read off DP) ----------------------------------------
    from hera_ray.offline.encoders import train_encoder_classifier

    def encoder(name: str, split: ds.Split, labels: list[str]) -> Callable[[Path], dict[str, Any]]:
        def fit_entry(folder: Path) -> dict[str, Any]:
            log(f"{name}: {len(split.train)} training / {len(split.heldout)} held-out example(s)")
            stats = train_encoder_classifier(
                [t for t, _ in split.train], [y for _, y in split.train], folder, label_names=labels,
                base=config.encoder_base, r=config.lora_r, epochs=config.encoder_epochs, lr=config.encoder_lr,
                class_weighted=name not in config.unweighted_set(),
                seed=config.seed + {"hybridllm": 1, "routellm": 2}.get(name, 0),
                eval_texts=[t for t, _ in split.heldout] or None, eval_labels=[y for _, y in split.heldout] or None)
            entry = {"kind": "encoder", "base": config.encoder_base, "path": name, "labels": labels,
                     "class_weighted": name not in config.unweighted_set(),
                     "train_examples": len(split.train), "heldout_examples": len(split.heldout),
                     "metrics": {k: stats[k] for k in ("accuracy", "majority_baseline") if k in stats},
                     "train_s": stats.get("train_s")}
            if name == "dp":
                entry["input"] = config.dp_input
                entry["metrics"]["cd_accuracy"] = _cd_accuracy(folder, records, pcfg.max_distance, config.dp_input)
            elif config.cv_folds > 1:
                entry["metrics"].update(_cross_validate(split.train + split.heldout, labels, config, folder.parent))
            return entry
        return fit_entry

    request_labels = ["complex", "simple"]
    train_one("urc", urc := ds.urc_examples(records), encoder("urc", urc, request_labels))
    train_one("hybridllm", urc, encoder("hybridllm", urc, request_labels))
    train_one("routellm", rl := ds.routellm_examples(records), encoder("routellm", rl, ds.OUTCOMES))
    dp = ds.dp_examples(records, config.dp_input)
    dp_labels = distance_labels(pcfg.max_distance)
    if config.dp_input == "confidence" and not dp.train and "dp" in config.wanted() and any(r["nodes"] for r in records):
        raise ConfigError("DP reads the SLM's confidence (dp_input confidence), but no profiled node has the SLM's "
                          "log-probabilities (a profile from before they were recorded): train with --dp-input context+slm")

    def dp_softmax(folder: Path) -> dict[str, Any]:
        """DP over the SLM's confidence in its next step: a logistic regression (seconds to fit)."""
        from hera_ray.estimators.logistic import DP_FILE, train_softmax

        log(f"dp: {len(dp.train)} training / {len(dp.heldout)} held-out node(s), logistic regression over the "
            "SLM's next step (its token log-probabilities, length, shape, place)")
        t0 = time.perf_counter()
        clf = train_softmax(dp.train, dp_labels, seed=config.seed)
        held = dp.heldout or dp.train
        predicted = [clf.predict(f) for f, _ in held]
        counts = Counter(label for _, label in dp.train)
        majority = counts.most_common(1)[0][0]
        metrics = {"accuracy": sum(p == y for p, (_, y) in zip(predicted, held)) / len(held),
                   "majority_baseline": sum(y == majority for _, y in held) / len(held),
                   "cd_accuracy": sum((p != "inf") == (y != "inf") for p, (_, y) in zip(predicted, held)) / len(held)}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DP_FILE).write_text(json.dumps({**clf.to_dict(), "metrics": metrics}, indent=2))
        return {"kind": "logistic", "path": f"dp/{DP_FILE}", "labels": dp_labels, "input": config.dp_input,
                "train_examples": len(dp.train), "heldout_examples": len(dp.heldout), "metrics": metrics,
                "train_s": round(time.perf_counter() - t0, 2)}

    train_one("dp", dp, dp_softmax if config.dp_input == "confidence" else encoder("dp", dp, dp_labels))

    # -- hera-verify's step classifier: logistic regression on the SLM-path checks ---------------
    from hera_ray.offline.verifier import train_verifier, verifier_examples
    from hera_ray.policy.verify import VERIFIER_FILE

    def verifier(split: ds.Split) -> Callable[[Path], dict[str, Any]]:
        def fit_entry(folder: Path) -> dict[str, Any]:
            log(f"verifier: {len(split.train)} training / {len(split.heldout)} held-out checked SLM step(s)")
            clf = train_verifier(split, seed=config.seed)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / VERIFIER_FILE).write_text(json.dumps(clf.to_dict(), indent=2))
            return {"kind": "logistic", "path": f"verifier/{VERIFIER_FILE}", "labels": ["disagree", "agree"],
                    "train_examples": len(split.train), "heldout_examples": len(split.heldout), "metrics": dict(clf.metrics)}
        return fit_entry

    train_one("verifier", verifier_examples(records), verifier(verifier_examples(records)))
    if (out / "verifier" / VERIFIER_FILE).exists():  # where hera-verify looks for it in an estimator folder
        shutil.copyfile(out / "verifier" / VERIFIER_FILE, out / VERIFIER_FILE)

    # -- causal: SP_SLM, SP_LLM, SD (trained in torch, served by llama.cpp) ---------------------
    from hera_ray.estimators.generative import LoraGenerator
    from hera_ray.offline.causal import train_causal_lora

    base_gguf = resolve_model(config.causal_base).path

    def causal(name: str, split: ds.Split) -> Callable[[Path], dict[str, Any]]:
        def fit_entry(folder: Path) -> dict[str, Any]:
            heldout = _sample(split.heldout, config.max_eval, config.seed)
            if name in config.untrained():  # served as the base model itself: measured, not trained
                log(f"{name}: the base model itself ({config.causal_base}), no adapter; {len(heldout)} held-out example(s)")
                metrics: dict[str, Any] = {}
                if heldout:
                    base = LoraGenerator(config.causal_base)
                    try:
                        metrics["accuracy"] = metrics["base_accuracy"] = _generative_accuracy(
                            base, heldout, sbert(), pcfg.match_threshold, name)
                    finally:
                        base.close()
                return {"kind": "causal", "base": config.causal_base, "path": None, "train_examples": 0,
                        "train_pool": len(split.train), "heldout_examples": len(heldout), "metrics": metrics}
            train = _sample(split.train, config.max_examples, config.seed)
            log(f"{name}: {len(train)} of {len(split.train)} training / {len(split.heldout)} held-out example(s)")
            stats = train_causal_lora(train, Path(base_gguf), folder, r=config.lora_r, alpha=2 * config.lora_r,
                                      epochs=config.causal_epochs, lr=config.causal_lr, max_len=config.max_len,
                                      seed=config.seed)
            metrics = {}
            if heldout:
                tuned = LoraGenerator(config.causal_base, folder / "adapter.gguf")
                base = LoraGenerator(config.causal_base)
                try:
                    metrics["accuracy"] = _generative_accuracy(tuned, heldout, sbert(), pcfg.match_threshold, name)
                    metrics["base_accuracy"] = _generative_accuracy(base, heldout, sbert(), pcfg.match_threshold, name)
                finally:
                    tuned.close()
                    base.close()
            return {"kind": "causal", "base": config.causal_base, "path": f"{name}/adapter.gguf",
                    "train_examples": len(train), "train_pool": len(split.train), "heldout_examples": len(heldout),
                    "metrics": metrics, "train_s": stats.get("train_s"), "final_loss": stats.get("final_loss")}
        return fit_entry

    for name, split in (("sp_slm", ds.sp_examples(records, "slm", config.sp_format)),
                        ("sp_llm", ds.sp_examples(records, "llm", config.sp_format)),
                        ("sd", ds.sd_examples(records))):
        train_one(name, split, causal(name, split))

    for name, entry in estimators.items():
        if name in PAPER_ACCURACY:
            entry["paper_accuracy"] = PAPER_ACCURACY[name]
    manifest = {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": {"path": str(profile_dir), "dataset": ",".join(pcfgs), "split": pcfg.split, "requests": len(records),
                    "requests_by_dataset": {d: sum(r.get("dataset", pcfg.dataset) == d for r in records) for d in pcfgs},
                    "heldout_requests": heldout_requests, "data_sha256": dhash, "settings": pcfg.model_dump(),
                    "settings_by_dataset": {d: c.model_dump() for d, c in pcfgs.items()}},
        "train_settings": config.model_dump(),
        "similarity_model": config.encoder_base,
        "match_threshold": pcfg.match_threshold,
        "max_distance": pcfg.max_distance,
        "sp_format": config.sp_format,
        "dp_input": config.dp_input,
        "paper_accuracy": PAPER_ACCURACY,
        "estimators": estimators,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _cross_validate(examples: list[tuple[str, str]], labels: list[str], config: TrainConfig, scratch: Path) -> dict[str, Any]:
    """k-fold accuracy of a request classifier over every example (folds by a stable shuffle)."""
    import tempfile

    from hera_ray.offline.encoders import train_encoder_classifier

    k = min(config.cv_folds, len(examples))
    if k < 2:
        return {}
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    hits = majority_hits = 0
    for fold in range(k):
        test = [examples[i] for i in order[fold::k]]
        train = [examples[i] for j, i in enumerate(order) if j % k != fold]
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            stats = train_encoder_classifier([t for t, _ in train], [y for _, y in train], Path(tmp), label_names=labels,
                                             base=config.encoder_base, r=config.lora_r, epochs=config.encoder_epochs,
                                             lr=config.encoder_lr, seed=config.seed, eval_texts=[t for t, _ in test],
                                             eval_labels=[y for _, y in test], progress=False)
        hits += round(stats["accuracy"] * len(test))
        majority_hits += round(stats["majority_baseline"] * len(test))
    return {"cv_accuracy": hits / len(examples), "cv_majority_baseline": majority_hits / len(examples), "cv_folds": k}


def _cd_accuracy(dp_folder: Path, records: list[dict[str, Any]], max_distance: int, dp_input: str) -> float | None:
    from hera_ray.estimators.encoders import EncoderClassifier

    heldout = ds.cd_labels(records, max_distance, dp_input).heldout
    if not heldout:
        return None
    dp = EncoderClassifier(dp_folder)
    predicted = dp.predict([t for t, _ in heldout])
    hits = sum((label != "inf") == converges for label, (_, converges) in zip(predicted, heldout))
    return hits / len(heldout)


def _generative_accuracy(gen, heldout: list[tuple], sbert, threshold: float, name: str) -> float:
    """Share of held-out (messages, target[, continue]) examples whose prediction is >= ``threshold``
    similar to the target."""
    from tqdm.auto import tqdm

    pairs = []
    for example in tqdm(heldout, desc=f"{name}: held-out", leave=False):
        messages, target = example[0], example[1]
        if name == "sd":
            pred = " ".join(parse_parts(gen.generate(messages, max_tokens=SD_MAX_TOKENS)))
            target = " ".join(parse_parts(target))
        else:
            cont = bool(example[2]) if len(example) > 2 else False
            pred = clean_prediction(gen.generate(messages, max_tokens=SP_MAX_TOKENS, stop=("\n",), continue_final_message=cont))
            target = sp_target(target)
        pairs.append((pred, target))
    sims = sbert.similarities(pairs)
    return sum(s >= threshold for s in sims) / len(sims)
