"""Classifier heads on the MiniLM encoder (URC, DP, the HybridLLM router): inference side.

An adapter folder written by :func:`hera_ray.offline.encoders.train_encoder_classifier` holds a
peft LoRA adapter (plus the trained classification head) and ``labels.json``: the label names in
head order, the token budget and the base model. :class:`EncoderClassifier` loads base + adapter,
merges the LoRA deltas into the weights (a plain BERT forward afterwards, no adapter overhead),
and returns one probability per label.

Training and inference must cut long texts the same way, so the truncation lives here
(:func:`encode_head_tail`) and the trainer imports it. torch, transformers and peft are imported
inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

#: Tokens kept from the start of a text that is too long; the rest of the budget goes to its end.
HEAD_TOKENS = 64

#: Written next to the adapter: label names in head order, ``max_len``, ``head_tokens``, ``base``.
LABELS_FILE = "labels.json"


def encode_head_tail(tokenizer: Any, texts: Sequence[str], max_len: int,
                     head_tokens: int = HEAD_TOKENS) -> list[list[int]]:
    """Token ids (with ``[CLS]``/``[SEP]``) of each text, at most ``max_len`` of them.

    A text that is too long keeps its first ``head_tokens`` tokens and its last ones. DP inputs
    are the question followed by a growing subtask history: the question (head) says what is
    being solved, the latest subtasks (tail) say how far it got, and the middle matters least.
    Plain right truncation would drop the latest context, left truncation the question. The head
    shrinks to half the budget when ``max_len`` is small, so a tail is always kept.
    """
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    budget = max_len - n_special
    if budget < 2:
        raise ValueError(f"max_len={max_len} leaves no room for text after {n_special} special tokens")
    head = min(head_tokens, budget // 2)
    # The tokenizer adds its own special tokens (its template: [CLS] text [SEP] for BERT); the
    # mask tells them apart so only the text between them is cut. verbose=False: no "longer than
    # the model's maximum" warning, since the cut happens here.
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=False, return_special_tokens_mask=True,
                    verbose=False)
    out: list[list[int]] = []
    for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"]):
        content = [i for i, s in enumerate(special) if not s]
        if len(content) > budget:
            first, last = content[0], content[-1]
            ids = ids[:first + head] + ids[last + 1 - (budget - head):]
        out.append(list(ids))
    return out


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) tensors of a batch, right-padded to its longest row.

    Right padding keeps positions 0.. for the real tokens (BERT's position embeddings are
    absolute), so a text gets the same logits alone and in any batch.
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def read_labels(adapter_dir: Path) -> dict[str, Any]:
    """The ``labels.json`` of an adapter folder, with a clear error if it is not one."""
    path = Path(adapter_dir) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {adapter_dir} is not an encoder classifier folder "
                                "(train one with hera_ray.offline.encoders.train_encoder_classifier)")
    meta = json.loads(path.read_text())
    if not meta.get("labels"):
        raise ValueError(f"{path} lists no labels")
    return meta


def load_base_classifier(base: str, labels: Sequence[str]) -> tuple[Any, Any]:
    """(fresh ``AutoModelForSequenceClassification`` with one output per label, tokenizer).

    The head is new (random) on every call; transformers' report that it was not in the
    checkpoint is expected, so it is silenced, as is the per-load "Loading weights" bar.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from hera_ray.models import resolve_model

    path = str(resolve_model(base).path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), dtype=torch.float32,
            id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer


class EncoderClassifier:
    """A trained encoder classifier: texts in, one probability per label out.

    ``base`` overrides the base model recorded in ``labels.json`` (e.g. a folder path on a
    machine where the bundled name does not resolve); it must be the same weights.
    """

    def __init__(self, adapter_dir: Path, base: str | None = None, device: str = "cpu", batch_size: int = 32):
        import torch
        from peft import PeftModel

        self.adapter_dir = Path(adapter_dir)
        meta = read_labels(self.adapter_dir)
        self._labels: list[str] = [str(x) for x in meta["labels"]]
        self.max_len = int(meta["max_len"])
        self.head_tokens = int(meta.get("head_tokens", HEAD_TOKENS))
        self.base = base or meta["base"]
        self.batch_size = batch_size
        self.device = torch.device(device)

        model, self.tokenizer = load_base_classifier(self.base, self._labels)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = PeftModel.from_pretrained(model, self.adapter_dir).merge_and_unload()
        self.model = model.to(self.device).eval()
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def labels(self) -> list[str]:
        """Label names in the order of the classifier's outputs."""
        return list(self._labels)

    def predict_proba(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Softmax probabilities per label for each text (batched; sums to 1 per text).

        Texts are grouped by length before batching (less padding); results come back in
        input order.
        """
        import torch

        if not texts:
            return []
        encoded = encode_head_tail(self.tokenizer, texts, self.max_len, self.head_tokens)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[dict[str, float]] = [{} for _ in encoded]
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                ids, mask = pad_batch([encoded[i] for i in idx], self._pad_id)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
                for i, row in zip(idx, probs):
                    out[i] = dict(zip(self._labels, row))
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most probable label of each text."""
        return [max(p, key=p.__getitem__) for p in self.predict_proba(texts)]
