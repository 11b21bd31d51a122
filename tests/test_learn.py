"""hera learn on a real store (SQLite) of runs: what live traffic labels, a set promoted when the
most recent runs do not get worse, a worse one refused, and SP_LLM retrained with a real LoRA on
SmolLM2-135M."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from hera_ray.errors import ConfigError
from hera_ray.offline.learn import LearnConfig, learn, live_examples, sp_training
from hera_ray.policy.verify import VERIFIER_FILE, StepClassifier
from hera_ray.store import Store, run_row

pytestmark = pytest.mark.timeout(600)


def _classifier(sign: float) -> StepClassifier:
    """P(good) rises (sign 1) or falls (sign -1) with the step's mean token log-probability."""
    return StepClassifier(("mean_logprob",), (-0.5,), (1.0,), (4.0 * sign,), 0.0, {})


def _set(tmp: Path, verifier_sign: float) -> Path:
    folder = tmp / "serving"
    folder.mkdir()
    manifest = {"format": 1, "sp_format": "chain", "match_threshold": 0.7, "similarity_model": "minilm-l6",
                "estimators": {"sp_llm": {"kind": "causal", "base": "smollm2-135m", "path": None, "metrics": {}}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / VERIFIER_FILE).write_text(json.dumps(_classifier(verifier_sign).to_dict()))
    return folder


def _run(i: int, t: float, good_is_confident: bool) -> dict:
    """A hera-verify run: one kept confident SLM step, one borderline SLM step the LLM checked, and
    one LLM step. The checked step is kept when (confident == good_is_confident)."""
    rng = random.Random(i)
    confident = i % 2 == 0
    lps = [-0.05 * rng.random() for _ in range(6)] if confident else [-1.5 - rng.random() for _ in range(6)]
    kept = confident == good_is_confident
    a, b = 2 + i % 7, 3 + i % 5
    checked = {"index": 1, "subtask": f"Step 2: {a} + {b} = {a + b}", "output": f"Step 2: {a} + {b} = {a + b}\n",
               "placement": "edge" if kept else "cloud", "stage": "llm-check" if kept else "llm-rewrite",
               "scores": {"confidence": 0.5, "p_good": 0.5, "llm_score": 0.9 if kept else 0.1}, "slm_logprobs": lps,
               "rejected_output": "" if kept else f"Step 2: {a} + {b} = {a + b + 1}\n", "boundary": ""}
    if not kept:
        checked["subtask"] = checked["output"].strip()
    trace = [{"index": 0, "subtask": f"Step 1: We add {a} and {b}.", "output": f"Step 1: We add {a} and {b}.\n",
              "placement": "edge", "stage": "confidence", "scores": {"confidence": 0.99}, "slm_logprobs": [-0.01] * 5,
              "boundary": ""},
             checked,
             {"index": 2, "subtask": f"Answer: {a + b}", "output": f"Answer: {a + b}", "placement": "cloud",
              "stage": "llm-rewrite", "scores": {}, "boundary": ""}]
    for entry in trace:
        entry.setdefault("cost", 0.0)
    run = {"request_id": f"run-{i}", "policy": "hera-verify", "question": f"Request {i}: what is {a} + {b}?", "answer": str(a + b),
           "trace": trace, "slm_share": 0.5, "cost": 0.001}
    return run_row(run, None, "ok", t, t + 1)


def _store(tmp: Path, n: int, held_good_is_confident: bool, train_good_is_confident: bool) -> Store:
    store = Store(f"sqlite:///{tmp / 'store.sqlite'}")
    for i in range(n):
        recent = i >= int(n * 0.8)
        store.run(_run(i, 1000.0 + i, held_good_is_confident if recent else train_good_is_confident))
    store.run(run_row({"request_id": "failed", "policy": "hera-verify", "question": "q", "trace": []}, None, "error", 5000, 5001))
    store.flush(30)
    return store


def test_live_traffic_labels_sp_and_the_llm_verdicts_not_the_rest(tmp_path):
    store = _store(tmp_path, 10, True, True)
    try:
        live = live_examples(store.iter_runs(), "chain")
    finally:
        store.close()
    assert live.runs == 10  # the failed run is left out
    # SP_SLM: the kept SLM steps and the SLM steps the LLM rewrote; SP_LLM: the steps the LLM wrote.
    assert len(live.sp_slm) == 10 + 5 + 5 and len(live.sp_llm) == 10 + 5
    messages, target, cont, end = live.sp_slm[1][2]
    assert cont and end == "\n" and target.startswith("Step 2:") and "Step 1: We add" in messages[-1]["content"]
    verdicts = [ex for _, _, ex in live.verifier]
    assert len(verdicts) == 10 and {good for _, good, _ in verdicts} == {True, False}
    assert all("mean_logprob" in feats for feats, _, _ in verdicts)
    with pytest.raises(ConfigError, match=r"cannot learn dp from live traffic .*the LLM's own step"):
        LearnConfig(only="dp").wanted()


def test_a_better_classifier_is_promoted_into_a_new_set_with_its_history(tmp_path):
    serving = _set(tmp_path, verifier_sign=-1.0)  # the serving classifier ranks backwards
    store = _store(tmp_path, 60, True, True)
    try:
        result = learn(store, serving, tmp_path / "sets", LearnConfig(only="verifier", min_examples=10), log=lambda m: None)
        store.promotion(result["history"]).result(10)
        (recorded,) = store.promotions()
    finally:
        store.close()
    v = result["history"]["estimators"]["verifier"]
    assert v["promoted"] and v["after"] > v["before"] and v["heldout_examples"] == 12
    new = Path(result["set"])
    assert new.parent == tmp_path / "sets" and (new / VERIFIER_FILE).exists()
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["history"][-1]["estimators"]["verifier"]["promoted"] and "verifier" in manifest["estimators"]
    assert StepClassifier.load(new / VERIFIER_FILE).coef[0] > 0  # it learnt the right direction
    assert json.loads((serving / "manifest.json").read_text()).get("history") is None  # the serving set is untouched
    assert recorded["promoted"] and recorded["set_path"] == result["set"]


def test_a_worse_classifier_is_refused_and_the_serving_set_stays(tmp_path):
    serving = _set(tmp_path, verifier_sign=1.0)
    # The older runs teach the opposite of what the recent ones show: the new classifier is worse there.
    store = _store(tmp_path, 60, True, False)
    try:
        result = learn(store, serving, tmp_path / "sets", LearnConfig(only="verifier", min_examples=10), log=lambda m: None)
    finally:
        store.close()
    v = result["history"]["estimators"]["verifier"]
    assert result["set"] is None and not v["promoted"] and v["after"] < v["before"]
    assert not (tmp_path / "sets").exists() or not any((tmp_path / "sets").iterdir())


def test_a_question_held_out_is_never_trained_on(tmp_path):
    from hera_ray.offline.learn import _split

    examples = [(1.0, "q1", "a"), (2.0, "q2", "b"), (3.0, "q1", "c"), (4.0, "q3", "d")]
    split = _split(examples, cut=3.0)
    assert split.heldout == ["c", "d"] and split.train == ["b"]  # q1 asked again later: out of training


def test_too_little_traffic_is_said_not_guessed(tmp_path):
    serving = _set(tmp_path, 1.0)
    store = _store(tmp_path, 10, True, True)
    try:
        result = learn(store, serving, tmp_path / "sets", LearnConfig(min_examples=50), log=lambda m: None)
    finally:
        store.close()
    assert result["set"] is None
    assert all("50 training and 1 held-out needed" in r["reason"] for r in result["history"]["estimators"].values())


@pytest.mark.slow
def test_sp_llm_retrains_with_a_real_lora_and_is_measured_before_and_after(tmp_path):
    serving = _set(tmp_path, 1.0)
    store = _store(tmp_path, 40, True, True)
    try:
        result = learn(store, serving, tmp_path / "sets",
                       LearnConfig(only="sp_llm", min_examples=10, max_eval=8, epochs=2, lr=1e-3), log=lambda m: None)
    finally:
        store.close()
    r = result["history"]["estimators"]["sp_llm"]
    assert r["train_examples"] == 32 + 16 and r["heldout_examples"] == 8  # every answer, and the rewritten steps
    assert 0.0 <= r["before"] <= 1.0 and 0.0 <= r["after"] <= 1.0 and r["promoted"] == (r["after"] >= r["before"])
    if r["promoted"]:
        assert (Path(result["set"]) / "sp_llm" / "adapter.gguf").exists()


def test_sp_retrains_the_way_the_serving_set_was_trained_unless_told():
    manifest = {"train_settings": {"causal_epochs": 1, "causal_lr": 0.001}}
    assert sp_training(LearnConfig(), manifest) == (1, 0.001)
    assert sp_training(LearnConfig(epochs=3, lr=5e-4), manifest) == (3, 5e-4)
    assert sp_training(LearnConfig(), {}) == (2, 1e-4)
    with pytest.raises(ValueError):
        LearnConfig(lr=0)
