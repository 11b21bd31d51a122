"""LoRA classifier heads on the MiniLM encoder: URC, DP and the HybridLLM router.

URC (is the request simple enough for the SLM? 2 classes), DP (distance to alignment: ``"0"``,
``"1"``, ..., ``"K"``, ``"inf"``) and the HybridLLM router (2 classes) are all "text -> one of a
few labels" on small data sets (tens to a few hundred examples). A 22.7M BERT with LoRA on its
attention plus a trained head fits that in seconds on a CPU and does not overfit as fast as full
fine-tuning. Serving loads the result with :class:`hera_ray.estimators.encoders.EncoderClassifier`,
which cuts long texts with the same :func:`~hera_ray.estimators.encoders.encode_head_tail`.

torch, transformers and peft are imported inside the functions so that importing this module
(e.g. by the CLI for ``--help``) stays cheap.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from hera_ray.estimators.encoders import HEAD_TOKENS, LABELS_FILE, encode_head_tail, load_base_classifier, pad_batch
from hera_ray.offline.loop import fit


def natural_label_order(labels: Sequence[str]) -> list[str]:
    """Distinct labels, integers by value first, then the others by name.

    DP's classes are ``"0".."K"`` and ``"inf"``: a plain string sort would put ``"10"`` before
    ``"2"``, and the head order is what a reader of ``labels.json`` sees.
    """
    def key(name: str) -> tuple[int, int, str]:
        return (0, int(name), "") if re.fullmatch(r"-?\d+", name) else (1, 0, name)

    return sorted(set(labels), key=key)


def class_weights(label_ids: Sequence[int], n_labels: int) -> list[float]:
    """Inverse-frequency ("balanced") weights: ``n / (n_present * count)``; 0 for absent labels.

    On imbalanced sets (URC: most requests are simple) unweighted cross-entropy is minimised by
    leaning to the majority class; these weights make every present class count equally. They
    average to 1 over the training examples, so the loss keeps its scale and the learning rate
    means the same with and without weighting.
    """
    counts = Counter(label_ids)
    n, present = len(label_ids), len(counts)
    return [n / (present * counts[i]) if counts[i] else 0.0 for i in range(n_labels)]


def train_encoder_classifier(texts: list[str], labels: list[str], out_dir: Path, *,
                             label_names: list[str] | None = None, base: str = "minilm-l6", r: int = 8,
                             alpha: int = 16, target_modules: Sequence[str] = ("query", "value"),
                             epochs: int = 8, lr: float = 1e-3, batch_size: int = 16, max_len: int = 256,
                             seed: int = 0, class_weighted: bool = True, eval_texts: list[str] | None = None,
                             eval_labels: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Fit a LoRA adapter + classification head mapping each text to its label; save it.

    ``label_names`` fixes the head's outputs and their order (it may include labels that never
    occur in ``texts``, e.g. a DP distance not seen yet; they get pushed to low probability);
    by default it is the labels present, in :func:`natural_label_order`. Writes the peft adapter
    (``adapter_config.json``, ``adapter_model.safetensors``, which include the head) and
    ``labels.json`` into ``out_dir``. AdamW with a linear decay of the learning rate to 0;
    class-weighted cross-entropy if ``class_weighted`` (a no-op on balanced data). Deterministic
    for a given ``seed`` (head and LoRA init, dropout, batch order).

    Returns ``{"train_examples", "steps", "train_s", "final_loss"}`` (``final_loss``: mean over
    the last epoch), plus ``{"accuracy", "majority_baseline"}`` on the eval data if given; the
    baseline is the accuracy of always answering the training set's most common label.
    """
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    if not texts:
        raise ValueError("no training examples")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if (eval_texts is None) != (eval_labels is None) or len(eval_texts or []) != len(eval_labels or []):
        raise ValueError("eval_texts and eval_labels must be given together and have the same length")
    labels = [str(x) for x in labels]
    names = [str(x) for x in label_names] if label_names is not None else natural_label_order(labels)
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"label_names must be at least 2 distinct names, got {names}")
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted((set(labels) | set(map(str, eval_labels or []))) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in label_names {names}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # before loading: the new head is initialised from torch's RNG
    rng = random.Random(seed)

    model, tokenizer = load_base_classifier(base, names)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_head_tail(tokenizer, texts, max_len)
    targets = [index[x] for x in labels]
    weight = torch.tensor(class_weights(targets, len(names))) if class_weighted else None

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="SEQ_CLS", modules_to_save=["classifier"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = get_peft_model(model, config)

    def batch_loss(idx: list[int]) -> Any:
        ids, mask = pad_batch([encoded[i] for i in idx], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits.float(), torch.tensor([targets[i] for i in idx]), weight=weight)

    stats = fit(model, [len(e) for e in encoded], batch_loss, epochs=epochs, lr=lr, batch_size=batch_size,
                rng=rng, desc="encoder LoRA", progress=progress)
    model.save_pretrained(out_dir)
    (out_dir / LABELS_FILE).write_text(json.dumps(
        {"labels": names, "max_len": max_len, "head_tokens": HEAD_TOKENS, "base": _portable_base(base)}, indent=2) + "\n")
    result: dict[str, Any] = {"train_examples": len(texts), **stats}
    if eval_texts is not None and eval_labels is not None:
        predicted = _predict_ids(model, tokenizer, eval_texts, max_len, pad_id, batch_size=32)
        gold = [index[str(x)] for x in eval_labels]
        majority = Counter(targets).most_common(1)[0][0]
        n = max(1, len(gold))
        result["accuracy"] = sum(p == g for p, g in zip(predicted, gold)) / n
        result["majority_baseline"] = sum(g == majority for g in gold) / n
    return result


def _portable_base(base: str) -> str:
    """What ``labels.json`` records as the base: a bundled name as is, a path made absolute.

    A bundled name resolves on any machine with the model package; a relative path would only
    resolve from the directory training ran in.
    """
    from hera_ray.models import BUNDLED, resolve_model

    return base if base in BUNDLED else str(resolve_model(base).path)


def _predict_ids(model: Any, tokenizer: Any, texts: Sequence[str], max_len: int, pad_id: int,
                 batch_size: int) -> list[int]:
    """Argmax label index of each text with the in-memory (unmerged) model, in input order."""
    import torch

    encoded = encode_head_tail(tokenizer, texts, max_len)
    out: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            ids, mask = pad_batch(encoded[start:start + batch_size], pad_id)
            out += model(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1).tolist()
    return out
