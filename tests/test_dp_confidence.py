"""DP over the SLM's confidence in its next step (``dp_input: confidence``): the JSON logistic
model agrees with scikit-learn's, and the bundled set's DP reads a real step's log-probabilities,
scoring them on the SLM itself when the step comes without them."""

from __future__ import annotations

import asyncio
import json

import pytest

from hera_ray.errors import ConfigError
from hera_ray.estimators.logistic import SoftmaxClassifier, train_softmax


def _data(n_classes: int):
    import numpy as np

    rng = np.random.default_rng(0)
    labels = [str(k) for k in range(n_classes)]
    x = rng.normal(size=(240, 3))
    y = [labels[int(v)] for v in np.digitize(x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.3, size=240),
                                            np.linspace(-1, 1, n_classes + 1)[1:-1])]
    return [({"a": a, "b": b, "c": c}, label) for (a, b, c), label in zip(x.tolist(), y)], x, y


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_json_model_gives_scikit_learn_s_probabilities(n_classes):
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    train, x, y = _data(n_classes)
    labels = [str(k) for k in range(n_classes)] + ["inf"]  # a class the data never shows
    clf = SoftmaxClassifier.from_dict(json.loads(json.dumps(train_softmax(train, labels).to_dict())))
    ref = LogisticRegression(C=1.0, max_iter=5000).fit((x - x.mean(0)) / x.std(0), y)
    want = ref.predict_proba((x - x.mean(0)) / x.std(0))
    got = np.array([[clf.predict_proba(f)[str(c)] for c in ref.classes_] for f, _ in train])
    assert np.allclose(got, want, atol=1e-6)
    assert all(clf.predict_proba(f)["inf"] < 1e-9 for f, _ in train[:20])
    assert [clf.predict(f) for f, _ in train] == list(ref.predict((x - x.mean(0)) / x.std(0)))


def test_a_model_file_of_the_wrong_shape_is_refused_by_name(tmp_path):
    train, _, _ = _data(2)
    d = train_softmax(train, ["0", "1"]).to_dict()
    d["coef"] = d["coef"][:1]
    (tmp_path / "dp.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="differ in shape"):
        SoftmaxClassifier.load(tmp_path / "dp.json")
    with pytest.raises(ConfigError, match="no classifier at"):
        SoftmaxClassifier.load(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def bundled():
    from hera_ray.estimators.trained import LocalEstimators

    est = LocalEstimators(load=["dp", "sp_slm"])  # the bundled set: DP and the SLM (SP_SLM) it scores on
    yield est
    est.close()


QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
STEPS = [("In April she sold 48 clips.", "In April she sold 48 clips.\n")]


def test_the_bundled_dp_reads_how_sure_the_slm_was_of_its_step(bundled):
    from hera_ray.policy.base import PastStep, SubtaskContext

    assert bundled.manifest["dp_input"] == "confidence" and bundled.dp_softmax is not None
    ctx = SubtaskContext("r", QUESTION, 1, history=tuple(PastStep(s, o, "edge") for s, o in STEPS))
    step = "In May she sold 48 / 2 = 24 clips."
    sure = asyncio.run(bundled.distance(ctx, step, [-0.01] * 14))
    unsure = asyncio.run(bundled.distance(ctx, step, [-2.5, -3.0, -0.2, -4.0, -1.5, -2.0, -3.5]))
    assert (sure, unsure) == (0, None)  # on the LLM's path; never meets it
    # Without log-probabilities (SP_SLM predicted the step), the set scores it on the SLM itself.
    scored = bundled.slm_logprobs(QUESTION, STEPS, step)
    assert len(scored) >= 10 and all(lp <= 0 for lp in scored) and sum(lp > -0.05 for lp in scored) >= len(scored) // 2
    assert asyncio.run(bundled.distance(ctx, step)) == asyncio.run(bundled.distance(ctx, step, scored))


def test_sp_slm_writes_the_profiled_slm_step_with_the_log_probabilities_the_edge_recorded(bundled):
    """No train/serve skew: DP was trained on the log-probabilities the edge SLM wrote each profiled
    step with; in plain HERA, SP_SLM (the same model, greedy, to the line end) writes that step and
    its log-probabilities, at the first step of a request and after others."""
    from pathlib import Path

    from hera_ray.estimators.prompts import clean_prediction
    from hera_ray.offline import datasets as ds
    from hera_ray.offline.profile import read_profile

    records = read_profile(Path(__file__).resolve().parent.parent / "data" / "profiles" / "gsm8k")
    record = records[0]
    for node in [n for n in record["nodes"] if n["depth"] in (0, 1)][:2]:
        steps = ds._steps(node["context"])
        text = bundled.predict_subtask_sync("slm", record["question"], steps)
        assert text == clean_prediction(node["slm"]["subtask"])
        got, want = bundled.slm_logprobs(record["question"], steps, text), node["slm"]["logprobs"]
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < 0.1
