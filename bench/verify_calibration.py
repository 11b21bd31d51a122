#!/usr/bin/env python3
"""hera-verify's settings from the profile: how its three tiers would split the SLM's steps.

Reads the profile's LLM checks of the All-SLM path (``slm_checks``, data/profiles/<set>/) and, for
each checked SLM step, its confidence (geometric-mean token probability), the step classifier's
P(good) (trained on the other requests: 5 folds by request), the LLM's step score, and whether
the LLM's own step agreed (SBERT >= the profile's match threshold). For a grid of settings it
prints the share of steps each tier would decide and how often the kept steps agree with the LLM:

* ``confidence_keep``: kept outright; ``keep`` (the knob): kept by the classifier;
* the rest are checked by the LLM; ``llm_accept``: the LLM keeps it, else rewrites it.

This is the profile split only (tuning data); reported results come from ``hera bench``. Writes
bench/results/verify_calibration.json and a PNG of agreement against the share left on the SLM.

    python bench/verify_calibration.py [--profiles data/profiles] [--folds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def cross_validated(records: list[dict], folds: int) -> list[dict]:
    """One row per checked SLM step, with P(good) from a classifier that never saw its request."""
    import hashlib

    from hera_ray.offline.datasets import Split
    from hera_ray.offline.verifier import train_verifier, verifier_examples

    def fold_of(request_id: str) -> int:
        return int(hashlib.blake2b(request_id.encode(), digest_size=4).hexdigest(), 16) % folds

    rows = []
    for k in range(folds):
        train = [r for r in records if fold_of(r["request_id"]) != k]
        test = [r for r in records if fold_of(r["request_id"]) == k]
        tr = verifier_examples(train)
        te = verifier_examples(test)
        examples = tr.train + tr.heldout
        if not examples or not (te.train + te.heldout):
            continue
        clf = train_verifier(Split(train=examples, heldout=[]))
        for feats, agree, extras in te.train + te.heldout:
            rows.append({"p_good": clf.p_good(feats), "agree": agree, **extras})
    return rows


def simulate(rows: list[dict], confidence_keep: float, keep: float, llm_accept: float) -> dict:
    n = len(rows)
    by_conf = [r for r in rows if r["confidence"] >= confidence_keep]
    rest = [r for r in rows if r["confidence"] < confidence_keep]
    by_clf = [r for r in rest if r["p_good"] >= keep]
    checked = [r for r in rest if r["p_good"] < keep]
    accepted = [r for r in checked if r["llm_score"] >= llm_accept]
    rewritten = [r for r in checked if r["llm_score"] < llm_accept]
    kept = by_conf + by_clf + accepted

    def rate(rs):
        return sum(r["agree"] for r in rs) / len(rs) if rs else None

    return {"confidence_keep": confidence_keep, "keep": keep, "llm_accept": llm_accept, "steps": n,
            "by_confidence": len(by_conf) / n, "by_classifier": len(by_clf) / n, "checked": len(checked) / n,
            "kept_by_llm": len(accepted) / n, "rewritten": len(rewritten) / n, "slm_share": len(kept) / n,
            "agree_kept": rate(kept), "agree_unchecked": rate(by_conf + by_clf), "agree_rewritten": rate(rewritten),
            "disagreeing_kept": sum(not r["agree"] for r in kept) / n}


def check_score_variants(rows: list[dict], auc) -> list[dict]:
    """The policy's LLM score against the argmax share, per data set: their AUCs for agreement, and at
    each bar, how many kept steps disagree when the argmax share keeps as many steps as the score does."""
    out = []
    for name in ["all", *sorted({r["dataset"] for r in rows})]:
        rs = [r for r in rows if name == "all" or r["dataset"] == name]
        labels = [r["agree"] for r in rs]
        if len(set(labels)) < 2:
            continue
        at_bar = []
        for bar in (0.9, 0.95):
            kept = [r for r in rs if r["llm_score"] >= bar]
            by_share = sorted(rs, key=lambda r: (r["llm_argmax_share"], r["llm_score"]), reverse=True)[:len(kept)]
            at_bar.append({"bar": bar, "kept": len(kept),
                           "disagreeing_kept_llm_score": sum(not r["agree"] for r in kept),
                           "disagreeing_kept_argmax_share": sum(not r["agree"] for r in by_share)})
        out.append({"dataset": name, "steps": len(rs), "auc_llm_score": auc([r["llm_score"] for r in rs], labels),
                    "auc_argmax_share": auc([r["llm_argmax_share"] for r in rs], labels), "at_bar": at_bar})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=ROOT / "data" / "profiles")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verify_calibration.json")
    args = ap.parse_args()
    console = Console()
    from hera_ray.offline.train import read_profiles
    from hera_ray.offline.verifier import auc

    records, pcfg, by_set = read_profiles(args.profiles)
    rows = cross_validated(records, args.folds)
    if not rows:
        raise SystemExit(f"no LLM checks in the profiles under {args.profiles}")
    labels = [r["agree"] for r in rows]
    aucs = {s: auc([r[s] for r in rows], labels) for s in ("confidence", "p_good", "llm_score")}
    variants = check_score_variants(rows, auc)
    grid = [simulate(rows, c, k, a) for c in (0.95, 0.97, 0.99, 1.01) for k in (0.5, 0.7, 0.8, 0.9, 0.95, 1.01)
            for a in (0.3, 0.5, 0.7)]

    console.print(f"{len(rows)} checked SLM steps from {len(records)} requests ({', '.join(by_set)}); "
                  f"{sum(labels) / len(labels):.0%} agree with the LLM's own step")
    console.print("AUC for agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items() if v is not None))
    vt = Table(title="The LLM's check score: exp(mean log-ratio to its top token), the policy's, against the "
                     "share of tokens that are its top choice (as many steps kept at each bar)")
    for col in ("data set", "steps", "AUC llm_score", "AUC argmax share", "bar", "kept",
                "disagreeing kept: llm_score", "argmax share"):
        vt.add_column(col, justify="right")
    for v in variants:
        for b in v["at_bar"]:
            vt.add_row(v["dataset"], str(v["steps"]), f"{v['auc_llm_score']:.3f}", f"{v['auc_argmax_share']:.3f}",
                       f"{b['bar']:.2f}", f"{b['kept']}", str(b["disagreeing_kept_llm_score"]),
                       str(b["disagreeing_kept_argmax_share"]))
    console.print(vt)
    table = Table(title="hera-verify on the profile's checked SLM steps (share of steps)")
    for col in ("conf ≥", "keep", "llm ≥", "conf", "classifier", "checked", "rewritten", "SLM share", "kept agree",
                "kept but disagree"):
        table.add_column(col, justify="right")
    for g in grid:
        if g["llm_accept"] != 0.5:
            continue
        table.add_row(f"{g['confidence_keep']:.2f}", f"{g['keep']:.2f}", f"{g['llm_accept']:.1f}",
                      f"{g['by_confidence']:.0%}", f"{g['by_classifier']:.0%}", f"{g['checked']:.0%}",
                      f"{g['rewritten']:.0%}", f"{g['slm_share']:.0%}",
                      "—" if g["agree_kept"] is None else f"{g['agree_kept']:.0%}", f"{g['disagreeing_kept']:.0%}")
    console.print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a, marker in ((0.3, "o"), (0.5, "s"), (0.7, "^")):
        pts = [g for g in grid if g["llm_accept"] == a and g["confidence_keep"] == 0.97]
        ax.plot([g["slm_share"] for g in pts], [g["disagreeing_kept"] for g in pts], marker=marker, label=f"llm_accept {a}")
    ax.set_xlabel("share of steps left on the SLM")
    ax.set_ylabel("share of steps kept although the LLM disagreed")
    ax.set_title(f"hera-verify on {len(rows)} profiled SLM steps (confidence_keep 0.97; keep swept)")
    ax.legend()
    ax.grid(alpha=0.3)
    png = args.out.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/verify_calibration.py " + " ".join(sys.argv[1:]),
                                    "commit": commit, "requests": len(records), "datasets": list(by_set),
                                    "steps": len(rows), "agree_rate": sum(labels) / len(labels), "auc": aucs,
                                    "check_score_variants": variants,
                                    "grid": grid}, indent=2) + "\n")
    console.print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
