#!/usr/bin/env python3
"""Continual fine-tuning on a replayed stream of live traffic; writes bench/results/learn_replay.json.

The profile split is replayed as the runs a live cluster would have stored: each profiled request
gives its All-SLM run and its All-LLM run (the steps each model wrote; hera-verify's LLM checks of
the SLM's steps become the verdicts the step classifier learns from). The runs go into a fresh
store in request order, and `hera learn` (hera_ray.offline.learn) retrains SP_SLM, SP_LLM and the
step classifier on the older runs and checks them on the most recent ones (the profile's held-out requests,
which neither set trained on), against the serving set (the bundled one). Printed beside the paper's gains from retraining on live traces (Table 5:
SP_SLM 76.1 -> 80.1, SP_LLM 75.1 -> 78.1).

What the replay can and cannot show: the serving (bundled) set was trained on these same profile
requests, so retraining on their replay repeats its training data and can at best hold its
figures; it is not the paper's gain from new traces. So each SP is also scored as its base model
with no adapter ("base model"), which is what a set with no trained SP would serve: base -> after
is what learning from this traffic alone brings. SP_SLM is served as the SLM itself (no adapter:
at temperature 0 the SLM predicts its own next step), so its "before" is the base model. The new
SP LoRA is trained from the base model on the stored runs alone, the way the serving set's was
trained (epochs and learning rate from its manifest; HERA_LEARN_EPOCHS / HERA_LEARN_LR override).

A second pass shows a worse set refused: the same stream, but the training runs' LLM verdicts
inverted (as traffic whose labels went wrong would teach), so the retrained classifier ranks the
recent runs' steps worse than the serving one, and the serving set stays.

    python bench/learn_replay.py [--profiles data/profiles] [--only sp_slm,sp_llm,verifier]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

PAPER = {"sp_slm": (76.1, 80.1), "sp_llm": (75.1, 78.1)}


def replay_runs(records: list[dict], invert_verdicts_before: float | None = None) -> list[dict]:
    """Store rows of the runs the profile's requests stand for, in request order (1 s apart)."""
    from hera_ray.offline.datasets import is_heldout
    from hera_ray.policy.verify import ends_line, llm_step_score
    from hera_ray.store import run_row

    import hashlib

    rows = []
    t = 1_700_000_000.0
    # The requests the serving set trained on come first; its held-out requests come last, so the
    # most recent runs (where hera learn checks both sets) are ones neither set trained on. Within
    # each part the requests come in a fixed pseudo-random order (a hash of their id), so the data
    # sets are mixed as live traffic would mix them: hera learn keeps the most recent training
    # examples, and in the profile's folder order those would all be one data set's.
    def order(r: dict) -> tuple[bool, str]:
        return is_heldout(r["request_id"]), hashlib.sha256(r["request_id"].encode()).hexdigest()

    for r in sorted(records, key=order):
        checks = {c["index"]: c for c in r.get("slm_checks", ())}
        for side in ("all_slm", "all_llm"):
            trace = []
            for i, s in enumerate(r[side]["steps"]):
                entry = {"index": i, "subtask": s["subtask"], "output": s["output"], "boundary": s.get("boundary", ""),
                         "placement": "edge" if side == "all_slm" else "cloud", "stage": side, "scores": {}, "cost": 0.0}
                c = checks.get(i) if side == "all_slm" else None
                if c is not None and s.get("logprobs"):
                    score = llm_step_score(c["llm_logprobs"], c["llm_top_logprobs"], ends_line(s["output"]))
                    agree = bool(c["agree"])
                    if invert_verdicts_before is not None and t < invert_verdicts_before:
                        agree = not agree
                    entry.update(stage="llm-check" if agree else "llm-rewrite", slm_logprobs=s["logprobs"],
                                 scores={"llm_score": score})
                    if not agree:  # as hera-verify records a rewrite: the SLM's step was rejected
                        entry["rejected_output"] = s["output"]
                trace.append(entry)
            run = {"request_id": f"{r['request_id']}:{side}", "policy": side.replace("_", "-"), "question": r["question"],
                   "answer": r[side].get("answer", ""), "trace": trace, "slm_share": 1.0 if side == "all_slm" else 0.0,
                   "cost": 0.0}
            rows.append(run_row(run, None, "ok", t, t + 1))
            t += 1.0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=ROOT / "data" / "profiles")
    ap.add_argument("--only", default="sp_slm,sp_llm,verifier")
    ap.add_argument("--estimators", type=Path, default=None, help="The serving set (default: the bundled one).")
    ap.add_argument("--max-examples", type=int, default=400)
    ap.add_argument("--max-eval", type=int, default=120)
    ap.add_argument("--no-refusal", action="store_true", help="Skip the pass with inverted verdicts.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learn_replay.json")
    args = ap.parse_args()
    console = Console()

    from hera_ray.offline.datasets import is_heldout
    from hera_ray.offline.learn import LearnConfig, learn
    from hera_ray.offline.train import read_profiles
    from hera_ray.store import Store

    records, _, _ = read_profiles(args.profiles)
    tmp = Path(tempfile.mkdtemp(prefix="hera-learn-replay-"))
    passes = {"replay": None} if args.no_refusal else {"replay": None, "inverted-verdicts": True}
    results = {}
    for name, invert in passes.items():
        rows = replay_runs(records)
        if invert:  # the training part of the stream with its verdicts inverted
            cut = min(r["created_at"] for r in rows if is_heldout(r["run"]["request_id"].rsplit(":", 1)[0]))
            rows = replay_runs(records, invert_verdicts_before=cut)
        store = Store(f"sqlite:///{tmp / f'{name}.sqlite'}")
        try:
            for row in rows:
                store.run(row)
            store.flush(120)
            only = "verifier" if invert else args.only
            held = sum(is_heldout(r["run"]["request_id"].rsplit(":", 1)[0]) for r in rows)
            cfg = LearnConfig(only=only, max_examples=args.max_examples, max_eval=args.max_eval,
                              heldout_share=held / len(rows), compare_base=True)
            t0 = time.perf_counter()
            result = learn(store, args.estimators, tmp / "sets", cfg, log=lambda m: console.print(f"  {m}", highlight=False))
            results[name] = {**result["history"], "wall_s": time.perf_counter() - t0, "stored_runs": len(rows)}
        finally:
            store.close()
        results[name].pop("offline_only", None)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"passes": results, "paper": PAPER, "command": "python bench/learn_replay.py " + " ".join(sys.argv[1:]),
           "commit": commit}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")

    table = Table(title="hera learn on a replayed stream (held out: the most recent runs, requests no set trained on)")
    for col in ("pass", "estimator", "train", "held-out", "metric", "base model", "before (serving)", "after", "paper",
                "promoted"):
        table.add_column(col, justify="right" if col in ("train", "held-out", "base model", "before (serving)", "after")
                         else "left")

    def fig(r: dict, key: str) -> str:  # SP accuracy in % as the paper gives it; the classifier's AUC as is
        v = r.get(key)
        return "-" if v is None else (f"{100 * v:.1f}" if r.get("metric") == "accuracy" else f"{v:.3f}")

    for name, res in results.items():
        for est, r in res["estimators"].items():
            paper = PAPER.get(est)
            table.add_row(name, est, str(r["train_examples"]), str(r["heldout_examples"]),
                          {"accuracy": "accuracy %"}.get(r.get("metric"), r.get("metric", "-")),
                          fig(r, "base"), fig(r, "before"), fig(r, "after"),
                          f"{paper[0]} -> {paper[1]}" if paper else "-",
                          "yes" if r.get("promoted") else f"no{': ' + r['reason'] if r.get('reason') else ''}")
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
