#!/usr/bin/env python3
"""How fast does the runtime notice a fault and recover? Against the running local cluster
(``hera up --local-edges 2``: the registry inside the scheduler actor, edge nodes ``edge-0`` and
``edge-1``), each fault ``--rounds`` times, with a request in flight during each:

- ``edge_kill``: SIGKILL an edge node -> marked down (missed heartbeats) -> restarted (same node
  id) and registered again;
- ``edge_freeze``: SIGSTOP an edge node -> marked down -> SIGCONT -> up again;
- ``actor_kill``: kill the SubtaskScheduler actor -> Ray restarts it -> the edge nodes register
  with its new registry (target: within 5 s);
- ``replica_kill``: kill the cloud replica -> Serve starts another -> a cloud call answers again.

Each round sends one request and strikes while it runs: the edge faults strike the node that is
generating its step (found by asking each node what it has in flight), not a fixed one. A round
counts only when the request's trace shows it met the fault: a step that failed on the struck node
and was retried elsewhere (edges), a step whose cloud call failed and was retried (replica), a
request in flight across the restart (actor: Ray retries its calls, so the trace shows at most
``no-edge`` fallbacks). Every request must be answered (200); the table gives, per fault, the
rounds that met it and those answered. Writes bench/results/faults.json.

    python bench/faults.py [--rounds 3] [--url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "A farmer has 15 cows and buys 7 more, then sells 4. How many cows does the farmer have now?"


class Cluster:
    def __init__(self, url: str):
        from hera_ray import cluster

        self.url = url
        self.state = cluster.attach()  # a Ray driver, to kill actors
        self.expected = len(self.state.edge_pids)
        #: Edges restarted by a fault serve the model the scheduler places work on.
        self.edge_model = self.health().get("edge_model") or "qwen2.5-coder-0.5b"
        self.pool = ThreadPoolExecutor(8)

    def health(self) -> dict:
        try:
            r = httpx.get(f"{self.url}/healthz", timeout=5)
            return r.json() if r.status_code == 200 else {}
        except httpx.HTTPError:
            return {}

    def wait(self, predicate, timeout_s: float = 300) -> float:
        t0 = time.monotonic()
        while not predicate():
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"not recovered within {timeout_s:.0f}s: {self.health()}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def nodes_up(self) -> int:
        return self.health().get("nodes_up", -1)

    def in_flight_request(self, policy: str, tag: str):
        """A request that is running while the fault happens (its future); it must be answered."""
        return self.pool.submit(httpx.post, f"{self.url}/v1/agent/runs", timeout=900,
                                json={"question": QUESTION, "policy": policy, "request_id": tag})

    def busy_edge(self, timeout_s: float = 300) -> int:
        """The index of the edge node generating a step now (the one request in flight is on it)."""
        import grpc

        from hera_ray.wire import edge_load

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, address in enumerate(self.state.edge_addresses):
                try:
                    if edge_load(address).in_flight > 0:
                        return i
                except grpc.RpcError:
                    continue
            time.sleep(0.02)
        raise TimeoutError(f"no edge node started the request's step within {timeout_s:.0f}s")

    def edge(self, i: int) -> tuple[int, str]:
        return self.state.edge_pids[i], self.state.edge_addresses[i]

    def restart_edge(self, i: int) -> None:
        from hera_ray.cluster import _save_state
        from hera_ray.launcher import start_edge
        from hera_ray.models import cache_dir

        proc = start_edge(cache_dir() / "cluster" / "logs", f"edge-{i}", self.state.registry, Path(self.state.token_file),
                          model=self.edge_model, port=int(self.state.edge_addresses[i].rsplit(":", 1)[1]), detach=True)
        self.state.edge_pids[i] = proc.pid
        _save_state(self.state)  # so `hera down` stops the new process


def edge_kill(c: Cluster, tag: str) -> tuple[dict, object, str]:
    future = c.in_flight_request("all-slm", tag)
    i = c.busy_edge()
    pid, _ = c.edge(i)
    os.kill(pid, signal.SIGKILL)
    down = c.wait(lambda: c.nodes_up() == c.expected - 1)
    t0 = time.monotonic()
    c.restart_edge(i)  # a new process: loads the model, serves, registers
    c.wait(lambda: c.nodes_up() == c.expected)
    back = time.monotonic() - t0
    return {"marked_down_s": down, "restarted_and_up_s": back}, future, f"edge-{i}"


def edge_freeze(c: Cluster, tag: str) -> tuple[dict, object, str]:
    future = c.in_flight_request("all-slm", tag)
    i = c.busy_edge()
    pid, _ = c.edge(i)
    os.kill(pid, signal.SIGSTOP)
    try:
        down = c.wait(lambda: c.nodes_up() == c.expected - 1)
    finally:
        os.kill(pid, signal.SIGCONT)
    back = c.wait(lambda: c.nodes_up() == c.expected)
    return {"marked_down_s": down, "up_after_sigcont_s": back}, future, f"edge-{i}"


def actor_kill(c: Cluster, tag: str) -> tuple[dict, object, str]:
    import ray

    from hera_ray.scheduler.actor import SCHEDULER_NAME

    before = c.health()["scheduler_started_at"]
    future = c.in_flight_request("all-slm", tag)
    c.busy_edge()  # the request is under way
    ray.kill(ray.get_actor(SCHEDULER_NAME, namespace=c.state.namespace), no_restart=False)
    t0 = time.monotonic()
    back = c.wait(lambda: c.health().get("scheduler_started_at", before) != before)
    rejoined = c.wait(lambda: c.nodes_up() == c.expected)
    measures = {"actor_back_s": back, "edges_registered_again_s": rejoined, "total_s": time.monotonic() - t0}
    return measures, future, "scheduler" if not future.done() else ""


def replica_kill(c: Cluster, tag: str) -> tuple[dict, object, str]:
    import ray
    from ray import serve

    from cloud_node.deployment import DEPLOYMENT_NAME

    future = c.in_flight_request("all-llm", tag)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=c.state.app_name)
    deadline = time.monotonic() + 300
    while handle.load.remote().result(timeout_s=60).get("in_flight", 0) == 0:  # until the replica is generating
        if time.monotonic() > deadline:
            raise TimeoutError("the cloud replica never started the request's step")
        time.sleep(0.05)
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA") and f"#{DEPLOYMENT_NAME}#" in a["name"]][:1]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    t0 = time.monotonic()
    handle.load.remote().result(timeout_s=600)  # answered by the replacement
    return {"replaced_and_answering_s": time.monotonic() - t0}, future, "cloud"


def met_fault(name: str, run: dict, struck: str) -> str:
    """What in the answered request's trace shows it met the fault ('' if nothing does)."""
    trace = run.get("trace", [])
    if name in ("edge_kill", "edge_freeze"):
        hits = [t for t in trace if any(f.startswith(f"{struck}:") for f in t.get("failures", []))
                and t.get("node") != struck and t.get("retries", 0) >= 1]
        return f"step {hits[0]['index']} failed on {struck}, retried on {hits[0]['node']}" if hits else ""
    if name == "replica_kill":
        hits = [t for t in trace if any(f.startswith("cloud:") for f in t.get("failures", [])) and t.get("retries", 0) >= 1]
        return f"step {hits[0]['index']}'s cloud call failed and was retried" if hits else ""
    if name == "actor_kill":  # in flight across the kill (checked when it struck); Ray retried its calls
        fallbacks = sum(t.get("fallback") == "no-edge" for t in trace)
        return f"in flight across the restart; {fallbacks} step(s) fell back to the cloud (no-edge)" if struck else ""
    return ""


FAULTS = {"edge_kill": edge_kill, "edge_freeze": edge_freeze, "actor_kill": actor_kill, "replica_kill": replica_kill}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="ingress URL (default: $HERA_URL, else the cluster `hera up` started here)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    args = p.parse_args()
    from hera_ray.eval.bench import resolve_url

    console = Console()
    c = Cluster(resolve_url(args.url))
    if c.nodes_up() < 2:
        sys.exit(f"need a cluster with 2 local edge nodes up (`hera up --local-edges 2`); health: {c.health()}")
    names = args.faults.split(",")
    samples: dict[str, list[dict]] = {n: [] for n in names}
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    with Progress(console=console) as progress:
        task = progress.add_task("faults", total=len(names) * args.rounds)
        for r in range(args.rounds):
            for name in names:
                progress.update(task, description=name)
                tag = f"fault-{name}-{r}-{int(time.time())}"
                measures, future, struck = FAULTS[name](c, tag)
                samples[name].append(measures)
                c.wait(lambda: c.nodes_up() == c.expected)
                reply = future.result(timeout=900)
                run = reply.json() if reply.status_code == 200 else {}
                evidence = met_fault(name, run, struck) if reply.status_code == 200 else ""
                rounds[name].append({"request_id": tag, "struck": struck, "status": reply.status_code,
                                     "met_fault": bool(evidence), "evidence": evidence,
                                     **({} if reply.status_code == 200 else {"error": reply.text[:300]})})
                progress.advance(task)
    statuses = [x["status"] for rs in rounds.values() for x in rs]
    summary = {name: {k: {"median": round(statistics.median(s[k] for s in rows), 2),
                          "max": round(max(s[k] for s in rows), 2)} for k in rows[0]}
               for name, rows in samples.items()}
    table = Table(title=f"fault recovery, {args.rounds} rounds each (seconds)")
    for col in ("fault", "measure", "median", "max", "rounds that met the fault", "answered 200"):
        table.add_column(col, justify="left" if col in ("fault", "measure") else "right")
    for name, measures in summary.items():
        met = [x for x in rounds[name] if x["met_fault"]]
        for j, (k, v) in enumerate(measures.items()):
            table.add_row(name, k, f"{v['median']:.2f}", f"{v['max']:.2f}",
                          *((f"{len(met)}/{len(rounds[name])}", f"{sum(x['status'] == 200 for x in met)}/{len(met)}")
                            if j == 0 else ("", "")))
    console.print(table)
    ok = sum(s == 200 for s in statuses)
    counted = [x for rs in rounds.values() for x in rs if x["met_fault"]]
    console.print(f"requests in flight during the faults: {ok}/{len(statuses)} answered 200; "
                  f"{len(counted)} of {len(statuses)} rounds met their fault (their traces show it), "
                  f"{sum(x['status'] == 200 for x in counted)} of those answered 200")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "commit": commit, "rounds": args.rounds,
              "summary": summary, "samples": samples, "requests": len(statuses), "answered_200": ok,
              "rounds_met_fault": {n: sum(x["met_fault"] for x in rs) for n, rs in rounds.items()},
              "rounds_detail": rounds,
              "other_statuses": [s for s in statuses if s != 200],
              "error_samples": [x["error"] for rs in rounds.values() for x in rs if "error" in x][:5]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    sys.exit(0 if ok == len(statuses) and len(counted) == len(statuses) else 1)


if __name__ == "__main__":
    main()
