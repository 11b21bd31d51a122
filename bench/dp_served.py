#!/usr/bin/env python3
"""DP's held-out accuracy through the serving path, beside the figure `hera train` reports.

`hera train` scores DP on the profile's held-out nodes with the log-probabilities the edge SLM
wrote each step with. When plain HERA asks DP, the SLM's step is SP_SLM's prediction, and its
log-probabilities are those SP_SLM wrote it with (`LocalEstimators.slm_logprobs`). This runs that
path on every held-out node of the profile: SP_SLM predicts the SLM's next step from the node's
context, the bundled (or given) set's DP classifies it, and the table compares:

* how often SP_SLM's prediction is the profiled SLM step, and how far its log-probabilities are;
* DP's accuracy on the served features against the trained figure and the majority class.

    python bench/dp_served.py [--estimators hera_ray/estimators/trained/default] [--profiles data/profiles]

Writes bench/results/dp_served.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimators", default=None, help="estimator set (default: the bundled one)")
    ap.add_argument("--profiles", default=str(ROOT / "data" / "profiles"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dp_served.json"))
    args = ap.parse_args()

    import numpy as np

    from hera_ray.estimators.logistic import dp_features
    from hera_ray.estimators.prompts import clean_prediction, distance_label
    from hera_ray.estimators.trained import LocalEstimators
    from hera_ray.offline import datasets as ds
    from hera_ray.offline.train import read_profiles

    records, _, _ = read_profiles(Path(args.profiles))
    est = LocalEstimators(args.estimators, load=["dp", "sp_slm"])
    if est.dp_softmax is None:
        raise SystemExit(f"the set at {est.folder} has no DP over the SLM's confidence (dp_input {est.dp_input})")
    nodes = [(r, n) for r in records if ds.is_heldout(r["request_id"]) for n in r["nodes"]]
    train_labels = Counter(ds.distance_label(n["distance"]) for r in records if not ds.is_heldout(r["request_id"])
                           for n in r["nodes"])
    majority = train_labels.most_common(1)[0][0]
    rows, t0 = [], time.perf_counter()
    for r, n in track(nodes, description="held-out nodes"):
        steps = ds._steps(n["context"])
        predicted = est.predict_subtask_sync("slm", r["question"], steps)
        logprobs = est.slm_logprobs(r["question"], steps, predicted)
        served = est.dp_softmax.predict(dp_features(r["question"], steps, predicted, logprobs))
        profiled = est.dp_softmax.predict(dp_features(r["question"], steps, n["slm"]["subtask"], n["slm"]["logprobs"]))
        same = predicted == clean_prediction(n["slm"]["subtask"])
        m = min(len(logprobs), len(n["slm"]["logprobs"]))
        gap = float(np.max(np.abs(np.subtract(logprobs[:m], n["slm"]["logprobs"][:m])))) if same and m else None
        rows.append({"request_id": r["request_id"], "depth": n["depth"], "label": distance_label(n["distance"]),
                     "served": served, "profiled": profiled, "same_step": same, "max_logprob_gap": gap})
    seconds = time.perf_counter() - t0
    k = len(rows)
    gaps = [x["max_logprob_gap"] for x in rows if x["max_logprob_gap"] is not None]
    summary = {
        "heldout_nodes": k,
        "served_accuracy": sum(x["served"] == x["label"] for x in rows) / k,
        "trained_accuracy": sum(x["profiled"] == x["label"] for x in rows) / k,
        "majority_baseline": sum(x["label"] == majority for x in rows) / k,
        "served_equals_trained_prediction": sum(x["served"] == x["profiled"] for x in rows) / k,
        "sp_slm_same_step": sum(x["same_step"] for x in rows) / k,
        "max_logprob_gap_median": float(np.median(gaps)) if gaps else None,
        "max_logprob_gap_p95": float(np.percentile(gaps, 95)) if gaps else None,
        "seconds": round(seconds, 1), "estimators": str(est.folder), "profiles": args.profiles,
    }
    est.close()
    table = Table(title=f"DP on {k} held-out profile nodes")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, key in [("DP accuracy, served path (SP_SLM's step and log-probabilities)", "served_accuracy"),
                      ("DP accuracy, profiled SLM step (what `hera train` reports)", "trained_accuracy"),
                      ("majority class", "majority_baseline"),
                      ("same DP answer on both", "served_equals_trained_prediction"),
                      ("SP_SLM wrote the profiled SLM step", "sp_slm_same_step")]:
        table.add_row(name, f"{100 * summary[key]:.1f}%")
    table.add_row("max |log-prob gap| per same step, median / p95",
                  "—" if not gaps else f"{summary['max_logprob_gap_median']:.1e} / {summary['max_logprob_gap_p95']:.1e}")
    table.add_row("time", f"{seconds:.0f} s")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python bench/dp_served.py", **summary, "nodes": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
