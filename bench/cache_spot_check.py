#!/usr/bin/env python3
"""Spot check of the generation cache: do runs answered partly from the cache match runs without it?

``hera bench`` on a cluster started with ``--generation-cache`` lets policies and sweep points share
the steps they have in common. A step is then the text an engine wrote for the same prompt earlier,
maybe from another KV-cache state, where its numerics can differ in the last bits and flip a
near-tie. This script re-runs some of a cached bench's (policy, request) pairs on the running
cluster, which must have the cache off, and compares them with what the bench recorded: the same
verdict, the same answer, the same chain (the chain's last 4,000 characters, as recorded).

    python bench/cache_spot_check.py --records bench/results/dev14/runs/gsm8k-dev.jsonl \
        --policies hera-verify,all-llm --n 10

Prints a table and writes bench/results/cache_spot_check.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=Path, required=True, help="A cached bench's runs/<dataset>-<split>.jsonl.")
    ap.add_argument("--policies", default="hera-verify", help="Comma-separated policies to re-run.")
    ap.add_argument("--n", type=int, default=10, help="Requests per policy (the first N recorded).")
    ap.add_argument("--url", default=os.environ.get("HERA_URL"), help="Ingress URL [default: the cluster `hera up` started].")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache_spot_check.json")
    args = ap.parse_args()
    console = Console()

    from hera_ray.client import Client
    from hera_ray.eval.bench import record_of, resolve_url
    from hera_ray.eval.datasets import load

    meta = json.loads(args.records.with_suffix(".meta.json").read_text())
    if not meta.get("generation_cache"):
        console.print(f"{args.records} was not recorded with a generation cache: nothing to check")
        return 2
    recorded = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    items = {it.id: it for it in load(meta["dataset"], meta["split"])}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    rows = []
    with Client(resolve_url(args.url), timeout=1800) as client:
        health = client.health()
        if health.get("generation_cache"):
            console.print("the running hera-ray has the generation cache on: restart it without --generation-cache")
            return 2
        for key in ("cloud_model", "edge_model", "agent"):
            if health.get(key) != meta.get(key):
                console.print(f"the running hera-ray differs from the recorded one in {key}: "
                              f"{health.get(key)!r} vs {meta.get(key)!r}")
                return 2
        todo = [(p, r) for p in policies for r in [r for r in recorded if r["policy"] == p][: args.n]]
        with Progress(console=console) as progress:
            task = progress.add_task("re-running without the cache", total=len(todo))
            for policy, old in todo:
                t0 = time.perf_counter()
                run = client.run(items[old["item"]].question, policy=policy, max_steps=meta.get("max_steps"))
                new = record_of(items[old["item"]], policy, run, time.perf_counter() - t0)
                rows.append({"policy": policy, "item": old["item"], "same_verdict": new["correct"] == old["correct"],
                             "same_answer": new["answer"] == old["answer"], "same_chain": new["output"] == old["output"],
                             "correct_cached": old["correct"], "correct_uncached": new["correct"]})
                progress.advance(task)
    table = Table(title=f"generation cache spot check: {args.records.name}, re-run without the cache")
    for col in ("policy", "n", "same verdict", "same answer", "same chain", "acc cached", "acc uncached"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    summary = {}
    for p in policies:
        rs = [r for r in rows if r["policy"] == p]
        if not rs:
            continue
        s = {k: sum(r[k] for r in rs) / len(rs) for k in ("same_verdict", "same_answer", "same_chain", "correct_cached",
                                                           "correct_uncached")}
        summary[p] = {"n": len(rs), **s}
        table.add_row(p, str(len(rs)), *(f"{s[k]:.0%}" for k in ("same_verdict", "same_answer", "same_chain",
                                                                  "correct_cached", "correct_uncached")))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "records": str(args.records),
                                    "policies": summary, "runs": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
