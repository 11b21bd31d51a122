#!/usr/bin/env python3
"""Multi-host figures on the netns cluster (scripts/netns-cluster.sh: a Ray head, a Ray cloud worker
and two edge boxes in their own network namespaces); writes bench/results/cluster.json.

1. An edge box joins and takes work: with requests running on the other edge, start a fresh
   `hera edge serve` process on edge1 and time it to serving (model loaded, gRPC up), registered
   (the scheduler sees it up), its first subtask started and its first subtask done.
2. Re-route after an edge's link goes down: with one stream of requests and a subtask in flight on
   an edge, cut that edge's link (`link-down`) and time it to the registry marking the edge down,
   to the other (idle) edge starting and finishing the re-routed subtask, and to the end of the
   request (its trace shows the failure and the retry); then restore the link and time the edge back up.

Each is repeated --rounds times; the table gives the median and the max. Run it as root:

    sudo scripts/netns-cluster.sh up && python bench/cluster.py [--rounds 5]
    python bench/cluster.py --up --down          # start the cluster first, take it down after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "netns-cluster.sh"
HEAD = "198.18.77.1"
EDGES = {"edge1": "198.18.77.11", "edge2": "198.18.77.12"}
INGRESS = f"http://{HEAD}:8000"
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
POLL_S = 0.02


def script(*args: str, timeout: float = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"netns-cluster.sh {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def nodes_up() -> int | None:
    try:
        r = httpx.get(f"{INGRESS}/healthz", timeout=2)
        return r.json().get("nodes_up") if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def wait(predicate, timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` holds (polled every POLL_S)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(POLL_S)
    raise SystemExit(f"timed out after {timeout_s:.0f}s waiting for {what}")


def edge_load(host: str) -> tuple[int, int] | None:
    """(in flight, completed) of the edge node on ``host``, asked directly; None if it does not answer."""
    from hera_ray.wire import edge_pb2, edge_pb2_grpc

    try:
        with grpc.insecure_channel(f"{EDGES[host]}:50061") as channel:
            info = edge_pb2_grpc.EdgeWorkerStub(channel).Info(edge_pb2.InfoRequest(), timeout=1)
        return info.load.in_flight, info.load.completed
    except grpc.RpcError:
        return None


@dataclass
class Done:
    start: float
    end: float
    status: int
    trace: list[dict]


@dataclass
class Load:
    """``concurrency`` clients sending all-slm requests back to back through the head's ingress."""

    concurrency: int
    tag: str
    done: list[Done] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, n: int) -> None:
        with httpx.Client(timeout=300) as http:
            i = 0
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post(f"{INGRESS}/v1/agent/runs", json={"question": QUESTION, "policy": "all-slm",
                                                                     "request_id": f"{self.tag}-{n}-{i}"})
                    trace = r.json().get("trace", []) if r.status_code == 200 else []
                    self.done.append(Done(t0, time.monotonic(), r.status_code, trace))
                except httpx.HTTPError:
                    self.done.append(Done(t0, time.monotonic(), 0, []))
                i += 1

    def __enter__(self) -> "Load":
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(300)

    def failed(self) -> int:
        return sum(1 for d in self.done if d.status != 200)


def both_up() -> None:
    for host in EDGES:
        script("link-up", host)
    wait(lambda: nodes_up() == 2, 60, "both edges up")


def join_round(i: int, concurrency: int) -> dict:
    """A fresh edge process on edge1 while edge2 works: serving, registered, first subtask."""
    both_up()
    script("edge-stop", "edge1")  # drains and deregisters
    wait(lambda: nodes_up() == 1, 60, "edge1 gone")
    with Load(concurrency, f"join{i}") as load:
        wait(lambda: (edge_load("edge2") or (0, 0))[0] > 0, 60, "edge2 at work")
        t0 = time.monotonic()
        script("edge-start", "edge1")
        marks: dict[str, float] = {}
        while "first_done_s" not in marks:
            now = time.monotonic() - t0
            if now > 180:
                raise SystemExit(f"edge1 did not take work within 180 s: {marks}")
            load_ = edge_load("edge1")
            if load_ is not None:
                marks.setdefault("serving_s", now)
                if load_[0] > 0 or load_[1] > 0:
                    marks.setdefault("first_subtask_s", now)
                if load_[1] > 0:
                    marks["first_done_s"] = now
            if "registered_s" not in marks and nodes_up() == 2:
                marks["registered_s"] = time.monotonic() - t0
            time.sleep(POLL_S)
    marks.setdefault("registered_s", marks["first_subtask_s"])
    return {**{k: round(v, 3) for k, v in marks.items()}, "failed_requests": load.failed(), "requests": len(load.done)}


def reroute_round(i: int) -> dict:
    """One stream of requests (so the other edge is idle); cut the link of the edge that has a subtask
    in flight; time the registry marking it down, the other edge starting and finishing the re-routed
    subtask, and the request's end; restore the link and time the edge back up."""
    both_up()
    with Load(1, f"cut{i}") as load:
        victim = None

        def busy() -> bool:
            nonlocal victim
            victim = next((h for h in EDGES if (edge_load(h) or (0, 0))[0] > 0), None)
            return victim is not None

        wait(busy, 120, "a subtask in flight on an edge")
        other = next(h for h in EDGES if h != victim)
        done_before = (edge_load(other) or (0, 0))[1]
        t0 = time.monotonic()
        script("link-down", victim)
        marks: dict[str, float] = {}
        while "rerouted_subtask_done_s" not in marks or "marked_down_s" not in marks:
            now = time.monotonic() - t0
            if now > 120:
                raise SystemExit(f"no re-route off {victim} within 120 s: {marks}")
            in_flight, completed = edge_load(other) or (0, 0)
            if in_flight > 0 or completed > done_before:
                marks.setdefault("rerouted_started_s", now)
            if completed > done_before:
                marks.setdefault("rerouted_subtask_done_s", now)
            if "marked_down_s" not in marks and nodes_up() == 1:
                marks["marked_down_s"] = time.monotonic() - t0
            time.sleep(POLL_S)
        wait(lambda: any(d.start < t0 for d in load.done), 120, "the cut request's end")
    cut = next(d for d in load.done if d.start < t0)
    failures = [f for t in cut.trace for f in t.get("failures", []) if f.startswith(f"{victim}:")]
    t1 = time.monotonic()
    script("link-up", victim)
    wait(lambda: nodes_up() == 2, 60, f"{victim} back up")
    return {"cut": victim, **{k: round(v, 3) for k, v in marks.items()},
            "rerouted_request_done_s": round(cut.end - t0, 3), "rejoin_s": round(time.monotonic() - t1, 3),
            "request_status": cut.status, "trace_nodes": [t["node"] for t in cut.trace],
            "trace_failure": failures[0][:200] if failures else None,
            "failed_requests": load.failed(), "requests": len(load.done)}


def summary(rounds: list[dict], keys: list[str]) -> dict:
    out = {}
    for k in keys:
        values = [r[k] for r in rounds if k in r]
        if values:
            out[k] = {"median": round(statistics.median(values), 3), "max": round(max(values), 3), "n": len(values)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=3, help="Clients sending requests while an edge joins (the link-cut rounds use one).")
    ap.add_argument("--up", action="store_true", help="Start the netns cluster first (scripts/netns-cluster.sh up).")
    ap.add_argument("--down", action="store_true", help="Take the netns cluster down at the end.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    args = ap.parse_args()
    console = Console()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the netns cluster's links are cut and restored with `ip link`")
    up_s = None
    if args.up:
        t0 = time.monotonic()
        with console.status("scripts/netns-cluster.sh up ..."):
            script("up")
        up_s = round(time.monotonic() - t0, 1)
    if nodes_up() != 2:
        raise SystemExit(f"no netns cluster with 2 edges at {INGRESS}: run `sudo scripts/netns-cluster.sh up` (or --up)")
    load_before = os.getloadavg()
    joins, cuts = [], []
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("edge joins and takes work", total=args.rounds)
            for i in range(args.rounds):
                joins.append(join_round(i, args.concurrency))
                progress.advance(task)
            task = progress.add_task("edge link cut: re-route", total=args.rounds)
            for i in range(args.rounds):
                cuts.append(reroute_round(i))
                progress.advance(task)
    finally:
        for host in EDGES:
            script("link-up", host)
        script("edge-start", "edge1")
        if args.down:
            script("down")

    join_keys = ["serving_s", "registered_s", "first_subtask_s", "first_done_s"]
    cut_keys = ["marked_down_s", "rerouted_started_s", "rerouted_subtask_done_s", "rerouted_request_done_s", "rejoin_s"]
    result = {
        "what": "netns cluster (scripts/netns-cluster.sh): Ray head + Ray cloud worker + 2 edge boxes, SmolLM2 on edges "
                "and as the cloud model; heartbeat 1 s x 3 missed; gRPC keepalive 2 s + 2 s",
        "rounds": args.rounds, "join_concurrency": args.concurrency, "up_s": up_s,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_start": [round(x, 2) for x in load_before]},
        "join": {"summary": summary(joins, join_keys), "rounds": joins},
        "reroute": {"summary": summary(cuts, cut_keys), "rounds": cuts},
        "failed_requests": sum(r["failed_requests"] for r in joins + cuts),
        "command": "python bench/cluster.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    labels = {
        "serving_s": "fresh edge process → serving (model loaded, gRPC up)",
        "registered_s": "→ registered (scheduler sees it up)",
        "first_subtask_s": "→ its first subtask started",
        "first_done_s": "→ its first subtask done",
        "marked_down_s": "link down → registry marks the edge down",
        "rerouted_started_s": "link down → its in-flight subtask restarted on the other edge",
        "rerouted_subtask_done_s": "link down → that subtask done there",
        "rerouted_request_done_s": "link down → its request done (later steps included)",
        "rejoin_s": "link up → edge back up",
    }
    table = Table(title=f"multi-host figures, {args.rounds} rounds (seconds from the event)")
    for col in ("measure", "median s", "max s"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for part in ("join", "reroute"):
        for key, s in result[part]["summary"].items():
            table.add_row(labels[key], f"{s['median']:.2f}", f"{s['max']:.2f}")
    console.print(table)
    rerouted = sum(1 for r in cuts if r["trace_failure"] and r["request_status"] == 200)
    console.print(f"re-routed in-flight subtasks seen in {rerouted}/{len(cuts)} cut rounds; failed requests: "
                  f"{result['failed_requests']}; load average at start {load_before[0]:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
