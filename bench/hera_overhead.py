#!/usr/bin/env python3
"""Decision overhead of the placement policies in a real run; writes bench/results/hera_overhead.json.

Runs GSM8K dev questions under each policy (default ``hera`` and ``hera-verify``) through the
running hera-ray (or a local one it starts: the bundled pair, Qwen2.5-Coder-0.5B on the edge and
1.5B as the cloud LLM, the bundled estimators) and measures the time the policy took to decide as
a share of request time (the sum of its steps' latencies). Target: <= 5% for hera-verify.

* ``hera``: deciding is the estimator calls (URC, SP, SBERT, DP, SD through the estimator
  deployment) and the scheduler round trips.
* ``hera-verify``: deciding is the scheduler round trips and the policy's own code (confidence,
  the step classifier), reported as ``decision_share``; its LLM check (one prefill of a borderline
  step on the cloud model) is reported apart (``check_share``), and so is the SLM time thrown away
  on steps the LLM rewrote (``discarded_share``), because they are model time, not routing code.

Also: which stage decided how often, SLM share, and the decision latency by stage.

    python bench/hera_overhead.py [--questions 4] [--max-steps N] [--policies hera,hera-verify]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402


def run(console: Console, questions: int, max_steps: int | None, policies: list[str], split: str) -> list[dict]:
    from hera_ray import cluster
    from hera_ray.client import Client
    from hera_ray.config import HeraConfig
    from hera_ray.demo import _reachable
    from hera_ray.eval.datasets import load
    from hera_ray.eval.scorers import gsm8k_correct

    items = load("gsm8k", split, questions)
    state = cluster.load_state()
    started = False
    if state is None or not _reachable(state.ingress_url):
        if state is not None:
            cluster.down(log=lambda m: None)
        console.print("starting a local hera-ray (1 edge node)")
        state = cluster.up(HeraConfig(), local_edges=1, log=lambda m: console.print(f"  {m}", highlight=False))
        started = True
    results = []
    try:
        with Client(state.ingress_url, timeout=1800) as client, Progress(console=console) as progress:
            if client.health().get("generation_cache"):
                raise SystemExit(f"the running hera-ray answers repeated calls from a generation cache "
                                 f"({client.health()['generation_cache']}), so its steps take no engine time: "
                                 "restart it without --generation-cache to measure overhead")
            for policy in policies:
                runs = []
                task = progress.add_task(f"{policy}: GSM8K {split}", total=len(items))
                for item in items:
                    r = client.run(item.question, policy=policy, max_steps=max_steps)
                    r["correct"] = gsm8k_correct(r["answer"], item.answer)
                    runs.append(r)
                    progress.advance(task)
                results.append(summarise(policy, runs))
    finally:
        if started:
            cluster.down(log=lambda m: None)
    return results


def summarise(policy: str, runs: list[dict]) -> dict:
    trace = [t for r in runs for t in r["trace"]]
    decision = sum(t["decision_s"] for t in trace)
    latency = sum(t["latency_s"] for t in trace)
    by_stage: dict[str, list[float]] = defaultdict(list)
    for t in trace:
        by_stage[t["stage"]].append(t["decision_s"])
    per_subtask = [t["decision_s"] / t["latency_s"] for t in trace if t["latency_s"] > 0]
    return {
        "policy": policy, "requests": len(runs), "subtasks": len(trace),
        "decision_share": decision / latency if latency else 0.0,
        "check_share": sum(t.get("check_s", 0.0) for t in trace) / latency if latency else 0.0,
        "discarded_share": sum(t.get("speculative_s", 0.0) for t in trace) / latency if latency else 0.0,
        "request_s_p50": statistics.median(r["latency_s"] for r in runs) if runs else 0.0,
        "decision_share_median_subtask": statistics.median(per_subtask) if per_subtask else 0.0,
        "decision_s_p50": statistics.median(t["decision_s"] for t in trace) if trace else 0.0,
        "subtask_latency_s_p50": statistics.median(t["latency_s"] for t in trace) if trace else 0.0,
        "stages": dict(Counter(t["stage"] for t in trace)),
        "decision_s_p50_by_stage": {k: statistics.median(v) for k, v in by_stage.items()},
        "slm_share": sum(t["placement"] == "edge" for t in trace) / len(trace) if trace else 0.0,
        "accuracy": sum(r["correct"] for r in runs) / len(runs) if runs else 0.0,
        "cloud_tokens": sum(r["cloud_tokens"] for r in runs),
        "cost_per_request": sum(r["cost"] for r in runs) / len(runs) if runs else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=None, help="Steps per request at most (default: the cluster's).")
    ap.add_argument("--policies", default="hera,hera-verify")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hera_overhead.json")
    args = ap.parse_args()
    console = Console()
    t0 = time.perf_counter()
    results = run(console, args.questions, args.max_steps, [p.strip() for p in args.policies.split(",") if p.strip()],
                  args.split)

    for result in results:
        table = Table(title=f"{result['policy']}: decision overhead on {result['requests']} GSM8K {args.split} requests")
        for col in ("measure", "value", "target"):
            table.add_column(col, justify="right" if col != "measure" else "left")
        table.add_row(f"decision time / request time ({result['subtasks']} steps)", f"{result['decision_share']:.1%}", "<= 5%")
        table.add_row("LLM check prefill / request time", f"{result['check_share']:.1%}", "")
        table.add_row("discarded SLM steps / request time", f"{result['discarded_share']:.1%}", "")
        table.add_row("median per-step share", f"{result['decision_share_median_subtask']:.1%}", "")
        table.add_row("decision p50 / step latency p50", f"{result['decision_s_p50'] * 1000:.1f} ms / {result['subtask_latency_s_p50']:.2f} s", "")
        table.add_row("stages", " ".join(f"{k}:{v}" for k, v in sorted(result["stages"].items())), "")
        table.add_row("decision p50 by stage", " ".join(f"{k}:{v * 1000:.1f}ms" for k, v in sorted(result["decision_s_p50_by_stage"].items())), "")
        table.add_row("SLM share / accuracy", f"{result['slm_share']:.0%} / {result['accuracy']:.0%}", "")
        console.print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python bench/hera_overhead.py " + " ".join(sys.argv[1:]), "commit": commit,
              "wall_s": time.perf_counter() - t0, "policies": {r["policy"]: r for r in results}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
