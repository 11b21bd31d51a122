#!/usr/bin/env python3
"""Does a model's own hidden state of the request predict URC's label? A probe on the profile.

URC (is the request simple enough for the SLM: its all-SLM answer right, or the LLM's wrong too)
reads the question alone, and its trained figure stays under the majority class (README, "What
limits the misses"). The lever left untried was a stronger encoder. This probe tries the
strongest one at hand that serving could afford: the model's own representation of the request,
as it reads the request (the chat-templated question), mean-pooled over the last layer by
llama.cpp (``Llama(embedding=True, pooling_type=1)``), under a logistic regression.

The regularisation C is chosen by 5-fold cross-validation on the training requests only; the
held-out requests (the profile's own held-out split, ``is_heldout``) score it once. The table also
gives the AUCs and a 5-fold cross-validation over all requests at three shuffles, since 62
held-out requests move by 1.6 points a request.

    python bench/urc_probe.py [--model qwen2.5-coder-0.5b] [--profiles data/profiles]

Writes bench/results/urc_probe.json. The embeddings are kept in ~/.cache/hera-ray/urc_probe/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

C_GRID = [0.0003, 0.001, 0.003, 0.01, 0.1, 1.0]


def embed(model_path: Path, questions: list[str], threads: int) -> "np.ndarray":
    import llama_cpp
    import numpy as np

    m = llama_cpp.Llama(str(model_path), embedding=True, pooling_type=1, n_ctx=2048, n_threads=threads,
                        verbose=False)
    return np.stack([np.asarray(m.embed(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
                                dtype=np.float32).ravel()
                     for q in track(questions, description="embedding the requests")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="bundled model name (as in `hera models`)")
    ap.add_argument("--profiles", default=str(ROOT / "data" / "profiles"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "urc_probe.json"))
    args = ap.parse_args()

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from hera_ray.models import resolve_model
    from hera_ray.offline import datasets as ds
    from hera_ray.offline.train import read_profiles

    records, _, _ = read_profiles(Path(args.profiles))
    model_path = resolve_model(args.model).path
    ids = [r["request_id"] for r in records]
    cache = Path.home() / ".cache" / "hera-ray" / "urc_probe" / f"{model_path.stem}.npz"
    t0 = time.perf_counter()
    if cache.exists() and list(np.load(cache)["ids"]) == ids:
        X = np.load(cache)["X"]
    else:
        X = embed(model_path, [r["question"] for r in records], args.threads)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, X=X, ids=np.array(ids))
    embed_s = time.perf_counter() - t0
    y = np.array([ds.request_simple(r) for r in records])
    ho = np.array([ds.is_heldout(i) for i in ids])

    def probe(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    rows = []
    for c in C_GRID:
        p_cv = cross_val_predict(probe(c), X[~ho], y[~ho], cv=folds, method="predict_proba")[:, 1]
        clf = probe(c).fit(X[~ho], y[~ho])
        q = clf.predict_proba(X[ho])[:, 1]
        all_cv = [float((cross_val_predict(probe(c), X, y, cv=StratifiedKFold(5, shuffle=True, random_state=s))
                         == y).mean()) for s in range(3)]
        rows.append({"C": c, "cv_train_accuracy": float(((p_cv > 0.5) == y[~ho]).mean()),
                     "cv_train_auc": float(roc_auc_score(y[~ho], p_cv)),
                     "heldout_accuracy": float(((q > 0.5) == y[ho]).mean()),
                     "heldout_auc": float(roc_auc_score(y[ho], q)),
                     "heldout_predicted_complex": int((q <= 0.5).sum()),
                     "cv_all_accuracy_3_shuffles": all_cv})
    chosen = max(rows, key=lambda r: r["cv_train_accuracy"])
    result = {
        "model": model_path.name, "pooling": "mean, last layer (llama.cpp embedding)", "requests": len(y),
        "train": int((~ho).sum()), "heldout": int(ho.sum()),
        "majority_train": float(max(y[~ho].mean(), 1 - y[~ho].mean())),
        "majority_heldout": float(max(y[ho].mean(), 1 - y[ho].mean())),
        "majority_all": float(max(y.mean(), 1 - y.mean())),
        "targets": {"paper_minus_5": 72.9}, "chosen_C_by_train_cv": chosen["C"], "grid": rows,
        "embed_s": round(embed_s, 1),
        "command": "python bench/urc_probe.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    t = Table(title=f"URC probe on {model_path.name}'s hidden state ({len(y)} profile requests, "
                    f"{int(ho.sum())} held out; majority: train {result['majority_train']:.1%}, "
                    f"held-out {result['majority_heldout']:.1%}, all {result['majority_all']:.1%})")
    for col in ("C", "CV acc (train)", "CV AUC (train)", "held-out acc", "held-out AUC", "held-out 'complex'",
                "CV acc, all 300 (3 shuffles)"):
        t.add_column(col, justify="right")
    for r in rows:
        mark = " *" if r is chosen else ""
        t.add_row(f"{r['C']:g}{mark}", f"{r['cv_train_accuracy']:.1%}", f"{r['cv_train_auc']:.3f}",
                  f"{r['heldout_accuracy']:.1%}", f"{r['heldout_auc']:.3f}", str(r["heldout_predicted_complex"]),
                  " / ".join(f"{a:.1%}" for a in r["cv_all_accuracy_3_shuffles"]))
    Console().print(t)
    Console().print(f"* chosen by cross-validation on the training requests. Wrote {args.out}")


if __name__ == "__main__":
    main()
