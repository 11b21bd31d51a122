#!/usr/bin/env python3
"""Control-plane cost of hera-ray, two ways; writes bench/results/control_plane.json.

1. Route decisions per second through the SubtaskScheduler actor with 1,000 registered edge
   nodes. The nodes are *stub* registrations (``stub-00000`` ...) that serve nothing: this part
   measures only the control plane. Target: >= 2,000 decisions/s.
2. Routing overhead in a real end-to-end ``all-slm`` run on the bundled models (local cluster,
   2 edge nodes, GSM8K test questions over HTTP): the share of end-to-end time spent outside
   model generation (the engines' own time to first token + decode). Target: <= 0.02.

    python bench/control_plane.py [--routes 20000] [--in-flight 256] [--questions 5]
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
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402


def decisions_through_actor(console: Console, nodes: int, routes: int, in_flight: int) -> dict:
    import ray

    from hera_ray.config import HeraConfig
    from hera_ray.scheduler.actor import SubtaskScheduler

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, object_store_memory=200_000_000,
             namespace="hera-bench", log_to_driver=False)
    try:
        # Stubs never heartbeat: give them an hour and a half before they count as down.
        config = HeraConfig.model_validate({"scheduler": {"registry_port": 0, "heartbeat_interval_s": 60,
                                                          "missed_heartbeats": 90}})
        actor = ray.remote(SubtaskScheduler).options(num_cpus=0, max_concurrency=1000).remote(
            config.model_dump(mode="json"))
        assert ray.get(actor.add_stub_nodes.remote(nodes, config.scheduler.edge_model)) == nodes

        def request(i: int) -> dict:
            return {"request_id": f"bench-{i}", "policy": "all-slm", "index": 0}

        # Sequential: one decision at a time, the latency a single agent step sees.
        lat = []
        for i in range(500):
            t0 = time.perf_counter()
            ray.get(actor.route.remote(request(i)))
            lat.append(time.perf_counter() - t0)
        # Pipelined: many agents routing at once, as under load.
        done = 0
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"routing through the actor ({nodes} stub nodes)", total=routes)
            pending = []
            for i in range(routes):
                pending.append(actor.route.remote(request(10_000 + i)))
                if len(pending) >= in_flight:
                    ready, pending = ray.wait(pending, num_returns=len(pending) // 2)
                    ray.get(ready)
                    done += len(ready)
                    progress.update(task, completed=done)
            ray.get(pending)
            progress.update(task, completed=routes)
        elapsed = time.perf_counter() - t0
        routed = ray.get(actor.route.remote(request(1)))
        assert routed["node_id"].startswith("stub-")
    finally:
        ray.shutdown()
    return {"decisions_per_s": routes / elapsed, "route_latency_p50_ms": statistics.median(lat) * 1000,
            "route_latency_p95_ms": sorted(lat)[int(0.95 * len(lat))] * 1000, "stub_nodes": nodes,
            "routes": routes, "in_flight": in_flight}


def decisions_in_process(nodes: int, routes: int) -> float:
    """The same decision as plain code (no Ray), for reference."""
    from hera_ray.policy import build_policies
    from hera_ray.scheduler.nodes import NodeSpec, NodeTable
    from hera_ray.scheduler.router import RouteRequest, Router
    from hera_ray.pricing import DEFAULT_CLOUD_PRICES

    table = NodeTable(heartbeat_interval_s=60, missed_heartbeats=90)
    for i in range(nodes):
        table.register(NodeSpec(f"stub-{i:05d}", f"127.0.0.1:{20000 + i}", "smollm2-135m", 2048, 1), "t")
    router = Router(table, build_policies(), "smollm2-135m", "qwen", DEFAULT_CLOUD_PRICES)

    async def run() -> float:
        t0 = time.perf_counter()
        for i in range(routes):
            await router.route(RouteRequest(f"r{i}", "all-slm", 0))
        return time.perf_counter() - t0

    return routes / asyncio.run(run())


def end_to_end_overhead(console: Console, questions: int, max_steps: int) -> dict:
    from hera_ray import cluster
    from hera_ray.client import Client
    from hera_ray.config import HeraConfig
    from hera_ray.eval.datasets import load

    items = load("gsm8k", "test", questions)
    state = cluster.up(HeraConfig(), local_edges=2, log=lambda m: console.print(f"  {m}", highlight=False))
    runs = []
    try:
        with Client(state.ingress_url) as client, Progress(console=console, transient=True) as progress:
            task = progress.add_task("all-slm agent runs over HTTP", total=len(items))
            client.run("warm-up", policy="all-slm", max_steps=1)
            for item in items:
                t0 = time.perf_counter()
                run = client.run(item.question, policy="all-slm", max_steps=max_steps)
                run["wall_s"] = time.perf_counter() - t0
                runs.append(run)
                progress.advance(task)
    finally:
        cluster.down(log=lambda m: None)
    wall = sum(r["wall_s"] for r in runs)
    model = sum(t["model_s"] for r in runs for t in r["trace"])
    decision = sum(t["decision_s"] for r in runs for t in r["trace"])
    return {"overhead_share": (wall - model) / wall, "e2e_requests": len(runs),
            "e2e_subtasks": sum(len(r["trace"]) for r in runs), "e2e_wall_s": wall, "e2e_model_s": model,
            "e2e_decision_s": decision, "e2e_slm_share": sum(r["slm_share"] for r in runs) / len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--routes", type=int, default=20_000)
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--skip-e2e", action="store_true", help="only the actor throughput part")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "control_plane.json")
    args = ap.parse_args()
    console = Console()

    result = decisions_through_actor(console, args.nodes, args.routes, args.in_flight)
    result["in_process_decisions_per_s"] = decisions_in_process(args.nodes, args.routes)
    if not args.skip_e2e:
        result.update(end_to_end_overhead(console, args.questions, args.max_steps))

    table = Table(title="hera-ray control plane")
    for col in ("measure", "value", "target"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row(f"route decisions/s via the actor ({args.nodes} stub nodes, {args.in_flight} in flight)",
                  f"{result['decisions_per_s']:,.0f}", ">= 2,000")
    table.add_row("route latency p50 / p95, one at a time", f"{result['route_latency_p50_ms']:.2f} / "
                  f"{result['route_latency_p95_ms']:.2f} ms", "")
    table.add_row("route decisions/s, plain code (no Ray)", f"{result['in_process_decisions_per_s']:,.0f}", "")
    if "overhead_share" in result:
        table.add_row(f"routing overhead, all-slm end to end ({result['e2e_requests']} GSM8K requests, "
                      f"{result['e2e_subtasks']} subtasks)", f"{result['overhead_share']:.2%}", "<= 2%")
    console.print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python bench/control_plane.py " + " ".join(sys.argv[1:]), "commit": commit, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
