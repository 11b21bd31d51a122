#!/usr/bin/env python3
"""Does the agent's step format keep each model's accuracy, and at what time cost?

On the first ``--n`` GSM8K test items (default 100):

* **one turn**: each model answers in one uninterrupted chain-of-thought turn (the step format's
  own system prompt, ``max_chain_tokens`` tokens at most, temperature 0) through the same
  llama.cpp backend the runtime serves it with (``EdgeWorker``, in this process, with the
  runtime's settings: the cloud deployment's context and threads for the LLM, an edge node's for
  the SLM), nothing else running;
* **agent**: ``all-llm`` and ``all-slm`` through the live runtime (a local cluster this script
  starts after the one-turn phase: Ray, the scheduler actor, the Serve app with the cloud LLM, one
  edge node), over HTTP as a user sends them.

Both are scored by the same scorer, reading the answer from the chain (``read_answer``). Prints a
table and writes ``bench/results/step_format.json``::

    {"n", "one_turn": {"llm", "slm"}, "agent": {"llm", "slm"}, "wall_ratio": {"llm", "slm"}, "commit", "command", ...}

Accuracy is a fraction; ``wall_ratio`` is agent wall time over one-turn wall time on the same
items. Per-item records go to ``bench/results/step_format_records.jsonl``; a re-run skips what is
there (``--fresh`` starts over), so the run can be stopped and resumed.

    python bench/step_format.py [--n 100] [--phases one_turn,agent] [--models llm,slm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

RESULTS = ROOT / "bench" / "results"
POLICY = {"llm": "all-llm", "slm": "all-slm"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load_records(path: Path) -> dict[tuple[str, str, str], dict]:
    done: dict[tuple[str, str, str], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["phase"], r["model"], r["id"])] = r
    return done


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def _score(item, text: str) -> tuple[str, bool]:
    """The answer read from a chain (or one turn's text) as the agent reads it, and whether it is right."""
    from hera_ray.agent.steps import chain_answer
    from hera_ray.eval.scorers import score

    answer, _, _ = chain_answer(text)
    return answer, score(item, answer, text).correct


def one_turn_phase(console: Console, items, models: list[str], records: Path, done: dict, config) -> None:
    """Each model, one chain-of-thought turn per item, through EdgeWorker in this process."""
    from edge_node.worker import EdgeWorker
    from hera_ray.agent.steps import one_turn_messages
    from hera_ray.config import EdgeNodeConfig
    from hera_ray.generation import GenerationParams
    from hera_ray.models import resolve_model

    edge = EdgeNodeConfig()
    settings = {"llm": (config.cloud.model, config.cloud.n_ctx, config.cloud.threads),
                "slm": (config.scheduler.edge_model, edge.n_ctx, edge.threads)}
    for side in models:
        todo = [it for it in items if ("one_turn", side, it.id) not in done]
        if not todo:
            continue
        model, n_ctx, threads = settings[side]
        worker = EdgeWorker(resolve_model(model).path, model, n_ctx=n_ctx, threads=threads)

        async def answer(item):
            params = GenerationParams(messages=one_turn_messages(item.question),
                                      max_tokens=config.agent.max_chain_tokens, temperature=0.0,
                                      request_id=f"one-turn:{item.id}")
            t0 = time.perf_counter()
            result = await worker.generate(params)
            return result, time.perf_counter() - t0

        try:
            with _progress(console) as progress:
                task = progress.add_task(f"one turn, {side} ({model}, {threads} thread(s))", total=len(todo))
                for item in todo:
                    result, wall = asyncio.run(answer(item))
                    got, correct = _score(item, result.text)
                    record = {"phase": "one_turn", "model": side, "id": item.id, "correct": correct, "answer": got,
                              "gold": item.answer, "wall_s": wall, "completion_tokens": result.completion_tokens,
                              "prompt_tokens": result.prompt_tokens, "text": result.text, "engine": model}
                    _append(records, record)
                    done[("one_turn", side, item.id)] = record
                    progress.advance(task)
        finally:
            worker.close()


def agent_phase(console: Console, items, models: list[str], records: Path, done: dict, config, url: str | None) -> None:
    """all-llm and all-slm through the live runtime, over HTTP."""
    from hera_ray import cluster
    from hera_ray.client import Client
    from hera_ray.demo import _reachable

    todo = {side: [it for it in items if ("agent", side, it.id) not in done] for side in models}
    if not any(todo.values()):
        return
    started = False
    if url is None:
        state = cluster.load_state()
        if state is not None and _reachable(state.ingress_url):
            url = state.ingress_url
            console.print(f"using the running hera-ray at {url}")
        else:
            if state is not None:
                cluster.down(log=lambda m: None)
            console.print("starting a local hera-ray: 1 edge node, the cloud LLM, no estimators")
            state = cluster.up(config, local_edges=1, log=lambda m: console.print(f"  {m}", highlight=False))
            url, started = state.ingress_url, True
    try:
        with Client(url, timeout=3600) as client, _progress(console) as progress:
            health = client.health()
            _write_cluster(records, health)
            for side in models:
                if not todo[side]:
                    continue
                task = progress.add_task(f"agent, {POLICY[side]}", total=len(todo[side]))
                for item in todo[side]:
                    t0 = time.perf_counter()
                    run = client.run(item.question, policy=POLICY[side])
                    wall = time.perf_counter() - t0
                    chain = run.get("chain", "")
                    got, correct = _score(item, chain)
                    trace = run["trace"]
                    record = {
                        "phase": "agent", "model": side, "id": item.id, "correct": correct, "answer": got,
                        "gold": item.answer, "wall_s": wall, "latency_s": run["latency_s"], "steps": len(trace),
                        "completion_tokens": sum(t["completion_tokens"] for t in trace),
                        "prompt_tokens": sum(t["prompt_tokens"] for t in trace),
                        "cached_prompt_tokens": sum(t["cached_prompt_tokens"] for t in trace),
                        "model_s": sum(t["model_s"] for t in trace), "decision_s": sum(t["decision_s"] for t in trace),
                        "cost": run["cost"], "finished": run["finished"], "text": chain,
                        "engine": health.get("cloud_model") if side == "llm" else health.get("edge_model"),
                    }
                    _append(records, record)
                    done[("agent", side, item.id)] = record
                    progress.advance(task)
    finally:
        if started:
            cluster.down(log=lambda m: None)


def _write_cluster(records: Path, health: dict) -> None:
    """The serving cluster's models and agent settings, as it reported them, beside the records."""
    keep = {k: health.get(k) for k in ("cloud_model", "edge_model", "cloud_prices", "cloud_step_format", "agent")}
    records.with_suffix(".cluster.json").write_text(json.dumps(keep, indent=2) + "\n")


def summarise(items, done: dict, models: list[str]) -> dict:
    out: dict = {"n": len(items), "one_turn": {}, "agent": {}, "wall_ratio": {}, "same_answer": {}, "same_text": {},
                 "n_complete": {}, "steps_per_request": {}, "agent_tokens_per_s": {}, "one_turn_tokens_per_s": {}}
    for side in models:
        pairs = [(done.get(("one_turn", side, it.id)), done.get(("agent", side, it.id))) for it in items]
        ones = [o for o, _ in pairs if o]
        agents = [a for _, a in pairs if a]
        both = [(o, a) for o, a in pairs if o and a]
        out["one_turn"][side] = sum(r["correct"] for r in ones) / len(ones) if ones else None
        out["agent"][side] = sum(r["correct"] for r in agents) / len(agents) if agents else None
        out["n_complete"][side] = {"one_turn": len(ones), "agent": len(agents), "both": len(both)}
        if both:
            out["wall_ratio"][side] = sum(a["wall_s"] for _, a in both) / sum(o["wall_s"] for o, _ in both)
            out["same_answer"][side] = sum(o["answer"] == a["answer"] for o, a in both) / len(both)
            out["same_text"][side] = sum(o["text"].strip() == a["text"].strip() for o, a in both) / len(both)
            out["steps_per_request"][side] = statistics.mean(a["steps"] for _, a in both)
            out["agent_tokens_per_s"][side] = sum(a["completion_tokens"] for _, a in both) / sum(a["wall_s"] for _, a in both)
            out["one_turn_tokens_per_s"][side] = sum(o["completion_tokens"] for o, _ in both) / sum(o["wall_s"] for o, _ in both)
            # On the same items: agent accuracy minus one-turn accuracy (the target: within 2 points).
            out.setdefault("accuracy_gap_same_items", {})[side] = (
                sum(a["correct"] for _, a in both) - sum(o["correct"] for o, _ in both)) / len(both)
        else:
            out["wall_ratio"][side] = None
    return out


def print_table(console: Console, summary: dict, models: list[str]) -> None:
    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    table = Table(title=f"Step format on GSM8K test (first {summary['n']} items): agent vs one turn")
    for col in ("model", "one turn acc", "agent acc", "gap (same items)", "target", "wall ratio", "target",
                "same answer", "same text", "steps/req"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for side in models:
        gap = summary.get("accuracy_gap_same_items", {}).get(side)
        ratio = summary["wall_ratio"].get(side)
        table.add_row(side, pct(summary["one_turn"].get(side)), pct(summary["agent"].get(side)),
                      "—" if gap is None else f"{gap * 100:+.1f} pt", "±2 pt",
                      "—" if ratio is None else f"{ratio:.3f}", "≤ 1.15",
                      pct(summary["same_answer"].get(side)), pct(summary["same_text"].get(side)),
                      "—" if side not in summary["steps_per_request"] else f"{summary['steps_per_request'][side]:.1f}")
    console.print(table)


def plot(summary: dict, models: list[str], path: Path) -> None:
    """Accuracy in one turn and through the agent per model, and the agent's time over one turn's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"llm": "LLM (Qwen2.5-Coder-1.5B)", "slm": "SLM (Qwen2.5-Coder-0.5B)"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(models))
    one = [100 * (summary["one_turn"].get(m) or 0) for m in models]
    agent = [100 * (summary["agent"].get(m) or 0) for m in models]
    ax1.bar([i - 0.2 for i in x], one, 0.4, label="one turn")
    ax1.bar([i + 0.2 for i in x], agent, 0.4, label="through the agent")
    ax1.set_xticks(list(x), [names.get(m, m) for m in models], fontsize=8)
    ax1.set_ylabel("GSM8K accuracy, %")
    ax1.set_ylim(0, 100)
    ax1.legend(fontsize=8)
    ax1.set_title(f"accuracy (first {summary['n']} test items)", fontsize=9)
    ratios = [summary["wall_ratio"].get(m) or 0 for m in models]
    ax2.bar(list(x), ratios, 0.5, color="tab:gray")
    ax2.axhline(1.15, color="tab:red", linestyle="--", linewidth=1, label="target 1.15")
    ax2.set_xticks(list(x), [names.get(m, m) for m in models], fontsize=8)
    ax2.set_ylabel("agent wall time / one turn")
    ax2.set_ylim(0, max(1.3, max(ratios) + 0.1))
    ax2.legend(fontsize=8)
    ax2.set_title("time cost of the step format and runtime", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="first N GSM8K test items")
    ap.add_argument("--phases", default="one_turn,agent", help="which phases to run (comma-separated)")
    ap.add_argument("--models", default="llm,slm", help="which sides (llm, slm)")
    ap.add_argument("--url", default=None, help="a running hera-ray's ingress (default: start a local one)")
    ap.add_argument("--records", type=Path, default=RESULTS / "step_format_records.jsonl")
    ap.add_argument("--out", type=Path, default=RESULTS / "step_format.json")
    ap.add_argument("--fresh", action="store_true", help="discard the records and start over")
    args = ap.parse_args(argv)
    console = Console()

    from hera_ray.config import HeraConfig
    from hera_ray.eval.datasets import load

    config = HeraConfig.model_validate({"hera": {"enabled": False}})
    items = load("gsm8k", "test", args.n)
    models = [m for m in args.models.split(",") if m]
    if args.fresh and args.records.exists():
        args.records.unlink()
    args.records.parent.mkdir(parents=True, exist_ok=True)
    done = _load_records(args.records)
    phases = args.phases.split(",")
    if "one_turn" in phases:
        one_turn_phase(console, items, models, args.records, done, config)
    if "agent" in phases:
        agent_phase(console, items, models, args.records, done, config, args.url)
    summary = summarise(items, done, models)
    print_table(console, summary, models)
    cluster_file = args.records.with_suffix(".cluster.json")
    summary.update(
        cluster=json.loads(cluster_file.read_text()) if cluster_file.exists() else None,
        commit=_commit(),
        command="python bench/step_format.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings={"max_chain_tokens": config.agent.max_chain_tokens, "max_tokens_per_step": config.agent.max_tokens_per_step,
                  "max_steps": config.agent.max_steps, "temperature": config.agent.temperature,
                  "llm": config.cloud.model, "slm": config.scheduler.edge_model, "llm_threads": config.cloud.threads,
                  "estimators": "off (hera.enabled false: all-llm and all-slm do not use them)"},
    )
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if all(summary["wall_ratio"].get(m) is not None for m in models):
        plot(summary, models, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
