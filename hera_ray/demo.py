"""``make demo`` / ``hera demo``: the main job on the embedded single-machine default.

It starts a local cluster (Ray head, scheduler actor with its edge registry, the Serve app with
the bundled Qwen2.5-Coder-1.5B as the cloud LLM, and 2 local edge nodes serving
Qwen2.5-Coder-0.5B), answers the first 10 GSM8K test questions under ``all-slm``, ``all-llm``, ``hera-verify`` (the SLM
writes every step; kept by confidence or the bundled step classifier, else checked by the LLM) and
``hera`` (the bundled trained estimators), prints a table of accuracy, SLM share, tokens, cost
(at the cloud price sheet: input, cached input and output priced apart) and latency, beside each
model's accuracy in one uninterrupted chain-of-thought turn on the same questions (measured by
``bench/step_format.py``), and stops what it started.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hera_ray.config import HeraConfig

DEMO_POLICIES = ("all-slm", "all-llm", "hera-verify", "hera")
#: Per-item one-turn results of bench/step_format.py (same models, prompt and settings).
ONE_TURN_RECORDS = Path(__file__).resolve().parent.parent / "bench" / "results" / "step_format_records.jsonl"


def hera_note() -> str:
    """What the ``hera`` row runs: the bundled estimator set, as its manifest describes it."""
    import json

    from hera_ray.estimators.trained import BUNDLED_ESTIMATORS, MANIFEST

    try:
        profile = json.loads((BUNDLED_ESTIMATORS / MANIFEST).read_text())["profile"]
    except (OSError, ValueError, KeyError):
        return "hera runs the bundled estimators"
    return (f"hera runs the bundled estimators, trained on {profile.get('requests', '?')} profiled requests "
            f"({profile.get('dataset', '?')}) of this pair; their held-out figures: GET /v1/estimators")


def one_turn_accuracy(item_ids: list[str], engines: dict[str, str], records: Path = ONE_TURN_RECORDS
                      ) -> dict[str, tuple[int, int]]:
    """{"llm": (correct, n), "slm": ...} of bench/step_format.py's one-turn runs on these items, for
    a side only if every item was run there on the model this cluster serves (``engines[side]``)."""
    import json

    out: dict[str, tuple[int, int]] = {}
    if not records.exists():
        return out
    wanted = set(item_ids)
    seen: dict[tuple[str, str], bool] = {}
    for line in records.read_text().splitlines():
        r = json.loads(line) if line.strip() else None
        if r and r.get("phase") == "one_turn" and r["id"] in wanted and r.get("engine") == engines.get(r["model"]):
            seen[(r["model"], r["id"])] = bool(r["correct"])
    for side in ("llm", "slm"):
        got = [v for (m, _i), v in seen.items() if m == side]
        if len(got) == len(wanted):
            out[side] = (sum(got), len(got))
    return out


def run_demo(n: int = 10, policies: tuple[str, ...] = DEMO_POLICIES, edges: int = 2, max_steps: int | None = None,
             keep: bool = False, config: HeraConfig | None = None, console: Console | None = None) -> dict:
    from hera_ray import cluster
    from hera_ray.client import Client
    from hera_ray.eval.datasets import load
    from hera_ray.eval.scorers import score

    console = console or Console()
    items = load("gsm8k", "test", n)
    config = config or HeraConfig()
    state = cluster.load_state()
    started = False
    if state is not None and _reachable(state.ingress_url):
        console.print(f"Using the running hera-ray at {state.ingress_url}")
    else:
        if state is not None:
            cluster.down(log=lambda m: None)  # a stale record from a cluster that is gone
        console.print(f"[bold]Starting hera-ray[/bold]: local Ray, {edges} edge node(s) with "
                      f"{config.scheduler.edge_model}, cloud LLM {config.cloud.model} on {config.cloud.backend}")
        state = cluster.up(config, local_edges=edges, log=lambda m: console.print(f"  {m}", highlight=False))
        started = True
    results: dict[str, list[dict]] = {p: [] for p in policies}
    try:
        with Client(state.ingress_url) as client, Progress(console=console) as progress:
            task = progress.add_task("GSM8K questions", total=len(items) * len(policies))
            for policy in policies:
                for item in items:
                    progress.update(task, description=f"{policy}: GSM8K #{item.id}")
                    t0 = time.perf_counter()
                    run = client.run(item.question, policy=policy, max_steps=max_steps)
                    run["wall_s"] = time.perf_counter() - t0
                    run["correct"] = score(item, run["answer"], run.get("chain", "")).correct  # as hera bench scores
                    run["gold"] = item.answer
                    results[policy].append(run)
                    progress.advance(task)
    finally:
        if started and not keep:
            console.print("Stopping what the demo started (hera down).")
            cluster.down(log=lambda m: None)
    summary = summarise(results)
    one_turn = one_turn_accuracy([it.id for it in items], {"llm": config.cloud.model_id or config.cloud.model,
                                                           "slm": config.scheduler.edge_model})
    _print(console, results, summary, items, one_turn, config)
    return {"results": results, "summary": summary, "one_turn": one_turn}


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    llm_cost = sum(r["cost"] for r in results.get("all-llm", [])) or None
    out = {}
    for policy, runs in results.items():
        subtasks = sum(len(r["trace"]) for r in runs)
        edge = sum(t["placement"] == "edge" for r in runs for t in r["trace"])
        cost = sum(r["cost"] for r in runs)
        # Overhead as bench/control_plane.py defines it: time outside the engines' own prefill + decode.
        model = sum(t["model_s"] for r in runs for t in r["trace"])
        lat = sum(r["latency_s"] for r in runs)
        out[policy] = {
            "accuracy": sum(r["correct"] for r in runs) / len(runs) if runs else 0.0,
            "slm_share": edge / subtasks if subtasks else 0.0,
            "subtasks": subtasks,
            "cloud_tokens": sum(r["cloud_tokens"] for r in runs),
            "cached_prompt_tokens": sum(t["cached_prompt_tokens"] for r in runs for t in r["trace"] if t["placement"] == "cloud"),
            "cost": cost,
            "cost_vs_all_llm": cost / llm_cost if llm_cost else None,
            "latency_p50_s": statistics.median(r["latency_s"] for r in runs) if runs else 0.0,
            "overhead_share": (lat - model) / lat if lat else 0.0,
            "decision_share": sum(t["decision_s"] for r in runs for t in r["trace"]) / lat if lat else 0.0,
            "stages": dict(Counter(t["stage"] for r in runs for t in r["trace"])),
        }
    return out


def _print(console: Console, results: dict, summary: dict, items, one_turn: dict | None = None,
           config: HeraConfig | None = None) -> None:
    table = Table(title=f"GSM8K test, {len(items)} question(s): where the steps ran and what it cost",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    # Fits an 80-column terminal; "cached": the share of cloud tokens read from the prompt cache.
    for col in ("policy", "acc", "SLM", "steps", "cloud tok", "cached", "cost $", "vs LLM", "p50 s", "ovh"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for policy, s in summary.items():
        rel = "—" if s["cost_vs_all_llm"] is None else f"{s['cost_vs_all_llm']:.2f}"
        cached = f"{s['cached_prompt_tokens'] / s['cloud_tokens']:.0%}" if s["cloud_tokens"] else "—"
        table.add_row(policy, f"{s['accuracy']:.0%}", f"{s['slm_share']:.0%}", str(s["subtasks"]),
                      str(s["cloud_tokens"]), cached, f"{s['cost']:.5f}", rel, f"{s['latency_p50_s']:.1f}",
                      f"{s['overhead_share']:.0%}")
    console.print(table)
    if config is not None:
        p = config.cloud.prices
        console.print(f"  cost: cloud steps at ${p.input_per_mtok} / ${p.cached_input_per_mtok} / ${p.output_per_mtok} per million "
                      f"input / cached input / output tokens (cloud.prices); edge steps free", highlight=False)
    one_turn = one_turn or {}
    labels = {"llm": ("all-llm", "the LLM"), "slm": ("all-slm", "the SLM")}
    for side, (policy, name) in labels.items():
        if side in one_turn and policy in summary:
            ok, n = one_turn[side]
            console.print(f"  {name} in one uninterrupted turn on the same questions: {ok}/{n} ({ok / n:.0%}); "
                          f"through the agent ({policy}): {summary[policy]['accuracy']:.0%}  [one turn: bench/step_format.py]",
                          highlight=False)
    if any(p.startswith("hera") for p in summary):
        console.print(f"  note: {hera_note()}", highlight=False)
    for policy, s in summary.items():
        if policy.startswith("hera") or policy == "hybridllm":
            stages = ", ".join(f"{k} {v}" for k, v in sorted(s["stages"].items()))
            console.print(f"  {policy}: decided by {stages}; decisions took {s['decision_share']:.1%} of request time",
                          highlight=False)
    for policy, runs in results.items():
        for item, run in zip(items, runs):
            mark = "[green]✓[/green]" if run["correct"] else "[red]✗[/red]"
            answer = " ".join(str(run["answer"]).split())[:70]
            console.print(f"  {mark} {policy:11} #{item.id:>4}: gold {run['gold']:>6}  answer: {answer}", highlight=False)


def _reachable(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False
