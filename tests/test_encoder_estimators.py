"""Encoder classifiers (URC/DP/router heads on MiniLM) learn, save and reload (real MiniLM, real LoRA).

The toy task is arithmetic questions vs sentences about colours. Held-out texts use phrasings and
words that never occur in training, so a passing accuracy needs the encoder's knowledge of what
the words mean, not memorised tokens; an untrained head is at chance (0.5) on them. The 3-class
run adds a label ("animal") with no training example, as DP has distances never seen in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

MATH_TRAIN = [
    "What is 7 plus 5?", "Compute the sum of 12 and 30.", "Multiply 6 by 9.", "Subtract 4 from 20.",
    "How much is 15 minus 8?", "Add 23 and 19 together.", "What is 9 times 7?", "Calculate 144 divided by 12.",
    "If I have 3 apples and buy 4 more, how many do I have?", "What is the product of 11 and 13?",
    "Find 25 percent of 80.", "Solve for x: x + 4 = 10.", "What is the square root of 49?",
    "Compute 2 to the power of 5.", "How many is 100 minus 37?", "Add up 5, 10 and 15.",
    "What do you get when you multiply 8 by 8?", "Divide 56 by 7.", "What is 18 plus 27?",
    "Calculate the difference between 90 and 45.",
]
COLOUR_TRAIN = [
    "My favourite colour is blue.", "The car was painted bright red.", "She wore a yellow scarf.",
    "The walls of the kitchen are pale green.", "He likes purple shoes.", "The sky turned orange at sunset.",
    "Their front door is painted black.", "The flowers in the garden are pink.", "I bought a white shirt.",
    "The curtains are a deep navy blue.", "Her bicycle is bright red.", "The leaves turn golden brown in autumn.",
    "We chose a grey sofa for the living room.", "The logo uses teal and silver.", "His jacket is dark green.",
    "The sunset painted the clouds crimson.", "She dyed her hair violet.", "The house has a light blue roof.",
    "The ribbon was a soft lavender shade.", "He painted the fence white.",
]
MATH_HELD_OUT = [
    "What is 64 divided by 8, then plus 3?", "Work out 17 times 4.", "Evaluate 250 minus 125.",
    "What is one third of 27?", "Sum 6 and 14, then double it.", "What is 13 squared?",
    "How much is 1000 divided by 4?", "Take 9 away from 31.",
]
COLOUR_HELD_OUT = [
    "Her dress was a lovely shade of turquoise.", "The barn is painted scarlet.", "They repainted the boat in beige.",
    "The tulips are a vivid magenta.", "My notebook has an olive cover.", "The wallpaper is cream with maroon stripes.",
    "The kitten's collar is bright indigo.", "The bathroom tiles are a calm aqua tone.",
]
#: Tens of examples make 2-3 steps per epoch: a higher rate than the default gets a confident head in
#: ~20 steps (the default 1e-3 also ranks held-out texts right, but with probabilities near 0.5).
FAST = {"epochs": 10, "lr": 3e-3, "max_len": 64}

ANIMAL = "The zebra grazed beside the giraffes on the savanna."

TEXTS = MATH_TRAIN + COLOUR_TRAIN
LABELS = ["math"] * len(MATH_TRAIN) + ["colour"] * len(COLOUR_TRAIN)
HELD_TEXTS = MATH_HELD_OUT + COLOUR_HELD_OUT
HELD_LABELS = ["math"] * len(MATH_HELD_OUT) + ["colour"] * len(COLOUR_HELD_OUT)


@pytest.fixture(scope="module")
def two_class(tmp_path_factory) -> tuple[Path, dict]:
    from hera_ray.offline.encoders import train_encoder_classifier

    out = tmp_path_factory.mktemp("urc")
    # imbalanced on purpose (20 math vs 10 colour): class weighting has to keep colour recall up
    texts = MATH_TRAIN + COLOUR_TRAIN[:10]
    labels = ["math"] * 20 + ["colour"] * 10
    result = train_encoder_classifier(texts, labels, out, **FAST, progress=False,
                                      eval_texts=HELD_TEXTS, eval_labels=HELD_LABELS)
    return out, result


@pytest.fixture(scope="module")
def three_class(tmp_path_factory) -> tuple[Path, dict]:
    from hera_ray.offline.encoders import train_encoder_classifier

    out = tmp_path_factory.mktemp("dp")
    result = train_encoder_classifier(TEXTS, LABELS, out, label_names=["math", "colour", "animal"],
                                      **FAST, seed=1, progress=False)
    return out, result


def test_two_class_learns_and_reloads(two_class: tuple[Path, dict]) -> None:
    from hera_ray.estimators.encoders import EncoderClassifier

    out, result = two_class
    assert result["train_examples"] == 30
    assert result["steps"] == 10 * 2  # 30 examples at batch 16 -> 2 steps per epoch
    assert result["final_loss"] < 0.3, result
    assert result["majority_baseline"] == 0.5  # training majority "math" is half of the held-out set
    assert result["accuracy"] >= 0.8, result

    meta = json.loads((out / "labels.json").read_text())
    assert meta == {"labels": ["colour", "math"], "max_len": 64, "head_tokens": 64, "base": "minilm-l6"}
    assert (out / "adapter_model.safetensors").is_file()

    clf = EncoderClassifier(out)  # a fresh object: everything comes from the folder
    assert clf.labels == ["colour", "math"]
    probs = clf.predict_proba(HELD_TEXTS)
    assert all(set(p) == {"colour", "math"} for p in probs)
    assert all(abs(sum(p.values()) - 1.0) < 1e-5 for p in probs)
    predicted = clf.predict(HELD_TEXTS)
    accuracy = sum(p == g for p, g in zip(predicted, HELD_LABELS)) / len(HELD_LABELS)
    # the merged, reloaded model answers like the one just trained (same weights, same truncation)
    assert accuracy == pytest.approx(result["accuracy"])
    assert accuracy >= 0.8
    # both classes are recalled despite the 2:1 imbalance in training
    assert sum(p == g == "colour" for p, g in zip(predicted, HELD_LABELS)) >= 6
    assert sum(p == g == "math" for p, g in zip(predicted, HELD_LABELS)) >= 6
    # batching does not change answers: one text alone equals its row in the batch
    alone = clf.predict_proba([HELD_TEXTS[3]])[0]
    assert alone == pytest.approx(probs[3], abs=1e-5)
    assert clf.predict_proba([]) == []


def test_three_class_absent_label_gets_low_probability(three_class: tuple[Path, dict]) -> None:
    from hera_ray.estimators.encoders import EncoderClassifier

    out, result = three_class
    assert json.loads((out / "labels.json").read_text())["labels"] == ["math", "colour", "animal"]
    clf = EncoderClassifier(out)
    assert clf.labels == ["math", "colour", "animal"]
    probs = clf.predict_proba(HELD_TEXTS + [ANIMAL])
    assert all(abs(sum(p.values()) - 1.0) < 1e-5 for p in probs)
    predicted = [max(p, key=p.__getitem__) for p in probs[:-1]]
    accuracy = sum(p == g for p, g in zip(predicted, HELD_LABELS)) / len(HELD_LABELS)
    assert accuracy >= 0.8, (accuracy, result)
    # never trained on: far below the 1/3 an untrained head gives it, and never the answer
    assert max(p["animal"] for p in probs[:-1]) < 0.15  # measured: 0.08
    assert "animal" not in clf.predict(HELD_TEXTS + [ANIMAL])


def test_same_seed_same_adapter(two_class: tuple[Path, dict], tmp_path: Path) -> None:
    """Retraining with the same data and seed reproduces the loss and the predictions exactly."""
    from hera_ray.estimators.encoders import EncoderClassifier
    from hera_ray.offline.encoders import train_encoder_classifier

    out, result = two_class
    again = train_encoder_classifier(MATH_TRAIN + COLOUR_TRAIN[:10], ["math"] * 20 + ["colour"] * 10, tmp_path,
                                     **FAST, progress=False)
    assert again["final_loss"] == result["final_loss"]
    first = EncoderClassifier(out).predict_proba(HELD_TEXTS[:4])
    second = EncoderClassifier(tmp_path).predict_proba(HELD_TEXTS[:4])
    assert first == second


def test_head_tail_truncation_keeps_question_and_latest_context() -> None:
    from transformers import AutoTokenizer

    from hera_ray.estimators.encoders import encode_head_tail
    from hera_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("minilm-l6").path))
    text = "question " + "more " * 600 + "latest"
    (ids,) = encode_head_tail(tok, [text], max_len=128)
    words = tok.convert_ids_to_tokens(ids)
    assert len(ids) == 128
    assert words[:2] == ["[CLS]", "question"] and words[-2:] == ["latest", "[SEP]"]
    assert words.count("more") == 128 - 4
    # a small budget keeps half head, half tail
    (small,) = encode_head_tail(tok, [text], max_len=12)
    assert tok.convert_ids_to_tokens(small) == ["[CLS]", "question"] + ["more"] * 8 + ["latest", "[SEP]"]
    # short texts are untouched
    (short,) = encode_head_tail(tok, ["what is two plus two"], max_len=128)
    assert short == tok("what is two plus two")["input_ids"]


def test_bad_inputs_are_rejected(tmp_path: Path) -> None:
    from hera_ray.estimators.encoders import EncoderClassifier
    from hera_ray.offline.encoders import natural_label_order, train_encoder_classifier

    with pytest.raises(ValueError, match="not in label_names"):
        train_encoder_classifier(["a", "b"], ["x", "y"], tmp_path, label_names=["x", "z"], progress=False)
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        train_encoder_classifier(["a", "b"], ["x"], tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="labels.json"):
        EncoderClassifier(tmp_path)
    assert natural_label_order(["inf", "10", "2", "0", "2"]) == ["0", "2", "10", "inf"]
