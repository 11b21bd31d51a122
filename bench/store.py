#!/usr/bin/env python3
"""What the durable store costs, on SQLite and on a real PostgreSQL server; writes bench/results/store.json.

For each backend:

1. ``writes_per_s``: ledger rows committed per second when the writer is kept full (rows queued
   as fast as the caller can, group-committed; SQLite with synchronous=FULL, so every commit is
   on disk).
2. ``added_route_ms_p50`` / ``_p99``: what the store adds to a routing decision. The scheduler's
   ``route`` never touches the store; its writes run on the writer thread. So the store can add
   only contention (the GIL, the CPU) to a decision. Measured as plain code, the way the actor
   runs it: the pure Router decides each step while the store takes that step's ledger row and
   key charge, as fast as the loop goes (far more steps per second than the engines here make).
   The same loop without a store is the baseline; the figure is the difference of the percentiles.
3. ``ack_ms_p50`` / ``_p99``: how long a step's report or charge waits for its row to be durable
   (it waits at most ``store.ack_timeout_s``; this is not part of the routing decision), with steps
   arriving at ``--ack-rate`` per second (a busy cluster; the bundled models make a few per second
   per edge). ``flood_ack_ms_*``: the same while the decision loop floods the writer.

Target: the store adds <= 1 ms p99 to a routing decision.

    python bench/store.py [--steps 20000] [--rows 50000] [--postgres URL]

Without --postgres, a temporary PostgreSQL server is started from the distribution's binaries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # pg_server: the tests' real PostgreSQL server

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def make_router(nodes: int):
    from hera_ray.policy import build_policies
    from hera_ray.pricing import DEFAULT_CLOUD_PRICES
    from hera_ray.scheduler.nodes import NodeSpec, NodeTable
    from hera_ray.scheduler.router import Router

    table = NodeTable(heartbeat_interval_s=60, missed_heartbeats=90)
    for i in range(nodes):
        table.register(NodeSpec(f"stub-{i:05d}", f"127.0.0.1:{20000 + i}", "edge", 2048, 4), "t")
    return Router(table, build_policies(), "edge", "cloud", DEFAULT_CLOUD_PRICES)


def route_loop(store, steps: int, nodes: int, progress: Progress, label: str) -> tuple[list[float], list[float]]:
    """Decide ``steps`` steps (random policy: half edge, half cloud), report each, and hand the
    store its rows; returns (decision seconds, ack seconds)."""
    from hera_ray.pricing import parse_prices
    from hera_ray.scheduler.router import RouteRequest, SubtaskReport
    from hera_ray.store import KeyCharge, LedgerRow

    router = make_router(nodes)
    decisions: list[float] = []
    acks: list[float] = []
    futures = []
    task = progress.add_task(label, total=steps)

    async def run() -> None:
        for i in range(steps):
            rid = f"r{i // 8}"
            t0 = time.perf_counter()
            route = await router.route(RouteRequest(rid, "random", i % 8))
            decisions.append(time.perf_counter() - t0)
            rep = SubtaskReport(request_id=rid, placement=route.placement, node_id=route.node_id,
                                prompt_tokens=300, cached_prompt_tokens=200, completion_tokens=40, prices=parse_prices(route.prices))
            cost = router.report(rep)
            if store is not None:
                now = time.time()
                submitted = time.perf_counter()
                f1 = store.ledger(LedgerRow(uuid.uuid4().hex, rid, route.node_id, route.placement.value, True,
                                            100, 200, 40, cost, now))
                f2 = store.charge(KeyCharge(uuid.uuid4().hex, "bench", cost, now))
                f1.add_done_callback(lambda _f, t=submitted: acks.append(time.perf_counter() - t))
                futures.extend((f1, f2))
            if i % 500 == 0:
                progress.update(task, completed=i)
                await asyncio.sleep(0)
        progress.update(task, completed=steps)

    asyncio.run(run())
    for f in futures:
        f.result(120)
    return decisions, acks


def paced_acks(store, rate: float, seconds: float, progress: Progress, label: str) -> list[float]:
    """Submit one step's ledger row and charge every 1/``rate`` s; the seconds each row took to be durable."""
    from hera_ray.store import KeyCharge, LedgerRow

    acks: list[float] = []
    n = int(rate * seconds)
    task = progress.add_task(label, total=n)
    futures = []
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        while time.perf_counter() < due:
            time.sleep(max(0.0, min(0.001, due - time.perf_counter())))
        submitted = time.perf_counter()
        f = store.ledger(LedgerRow(uuid.uuid4().hex, f"p{i // 8}", "stub-00000", "edge", True, 100, 200, 40, 0.0, time.time()))
        f.add_done_callback(lambda _f, t=submitted: acks.append(time.perf_counter() - t))
        futures.append(f)
        futures.append(store.charge(KeyCharge(uuid.uuid4().hex, "bench", 0.0001, time.time())))
        if i % 100 == 0:
            progress.update(task, completed=i)
    for f in futures:
        f.result(60)
    progress.update(task, completed=n)
    return acks


def writes_per_s(store, rows: int, progress: Progress, label: str) -> float:
    from hera_ray.store import LedgerRow

    task = progress.add_task(label, total=rows)
    t0 = time.perf_counter()
    last = None
    for i in range(rows):
        last = store.ledger(LedgerRow(uuid.uuid4().hex, f"w{i // 8}", "stub-00000", "edge", True, 100, 200, 40, 0.0, time.time()))
        if i % 1000 == 0:
            progress.update(task, completed=i)
    store.flush(300)
    last.result(10)
    progress.update(task, completed=rows)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_000, help="Routed steps per run of the decision loop.")
    ap.add_argument("--rows", type=int, default=50_000, help="Rows written in the throughput test.")
    ap.add_argument("--nodes", type=int, default=100, help="Stub edge nodes the router picks among.")
    ap.add_argument("--postgres", default=None, help="PostgreSQL URL (default: start a temporary server).")
    ap.add_argument("--ack-rate", type=float, default=200.0, help="Steps per second in the ack-latency phase.")
    ap.add_argument("--ack-seconds", type=float, default=10.0, help="Length of the ack-latency phase.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store.json")
    args = ap.parse_args()
    console = Console()

    from hera_ray.store import Store, redact

    server = None
    pg_url = args.postgres
    if pg_url is None:
        from pg_server import PostgresServer

        server = PostgresServer()
        server.start()
        pg_url = server.url
    tmp = Path(tempfile.mkdtemp(prefix="hera-store-bench-"))
    results: dict = {}
    try:
        with Progress(console=console, transient=True) as progress:
            base, _ = route_loop(None, args.steps, args.nodes, progress, "decisions, no store (baseline)")
            base_p50, base_p99 = pct(base, 0.5), pct(base, 0.99)
            for name, url in (("sqlite", f"sqlite:///{tmp / 'store.sqlite'}"), ("postgres", pg_url)):
                store = Store(url)
                try:
                    wps = writes_per_s(store, args.rows, progress, f"{name}: writes")
                    decisions, flood = route_loop(store, args.steps, args.nodes, progress, f"{name}: decisions with the store")
                    acks = paced_acks(store, args.ack_rate, args.ack_seconds, progress, f"{name}: acks at {args.ack_rate:g} steps/s")
                finally:
                    store.close()
                results[name] = {
                    "writes_per_s": wps,
                    "added_route_ms_p50": (pct(decisions, 0.5) - base_p50) * 1000,
                    "added_route_ms_p99": (pct(decisions, 0.99) - base_p99) * 1000,
                    "route_ms_p50": pct(decisions, 0.5) * 1000, "route_ms_p99": pct(decisions, 0.99) * 1000,
                    "ack_ms_p50": pct(acks, 0.5) * 1000, "ack_ms_p99": pct(acks, 0.99) * 1000, "ack_rate_per_s": args.ack_rate,
                    "flood_ack_ms_p50": pct(flood, 0.5) * 1000, "flood_ack_ms_p99": pct(flood, 0.99) * 1000,
                    "url": redact(url).replace(str(tmp), "<tmp>"),
                }
    finally:
        if server is not None:
            server.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {**results, "baseline": {"route_ms_p50": base_p50 * 1000, "route_ms_p99": base_p99 * 1000},
           "steps": args.steps, "rows": args.rows, "nodes": args.nodes, "target_added_route_ms_p99": 1.0,
           "command": "python bench/store.py " + " ".join(sys.argv[1:]), "commit": commit}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    table = Table(title=f"the store's cost ({args.steps} routed steps, {args.rows} rows; target: <= 1 ms p99 added per decision)")
    for col in ("backend", "writes/s", "route p50 ms", "route p99 ms", "added p50 ms", "added p99 ms",
                f"ack p50 ms @{args.ack_rate:g}/s", f"ack p99 ms @{args.ack_rate:g}/s"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    table.add_row("none (baseline)", "-", f"{base_p50 * 1000:.3f}", f"{base_p99 * 1000:.3f}", "-", "-", "-", "-")
    for name, r in results.items():
        table.add_row(name, f"{r['writes_per_s']:,.0f}", f"{r['route_ms_p50']:.3f}", f"{r['route_ms_p99']:.3f}",
                      f"{r['added_route_ms_p50']:.3f}", f"{r['added_route_ms_p99']:.3f}", f"{r['ack_ms_p50']:.2f}",
                      f"{r['ack_ms_p99']:.2f}")
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
