#!/usr/bin/env python3
"""How fast does the runtime notice a fault and recover? Against the running local cluster
(``hera up --local-edges 2``: the registry inside the scheduler actor, edge nodes ``edge-0`` and
``edge-1``), each fault ``--rounds`` times, with a request in flight during each:

- ``edge_kill``: SIGKILL an edge node -> marked down (missed heartbeats) -> restarted (same node
  id) and registered again;
- ``edge_freeze``: SIGSTOP an edge node -> marked down -> held frozen until the step fails there
  and is retried elsewhere -> SIGCONT -> up again;
- ``actor_kill``: kill the SubtaskScheduler actor -> Ray restarts it -> the edge nodes register
  with its new registry (target: within 5 s);
- ``replica_kill``: kill the cloud replica -> Serve starts another -> a cloud call answers again.

Each round sends one request and strikes while it runs: the edge faults strike the node that is
generating its step (found by asking each node what it has in flight), not a fixed one. A round
counts only when something shows the request met the fault, and the JSON says what (``met_by``):
- ``trace``: the request's trace shows the failure and the retry: a step that failed on the struck
  node and was retried on another (edges), a step whose cloud call failed and was retried (replica);
- ``timing`` (``actor_kill`` only): the trace cannot show it. Ray retries the calls that the killed
  actor did not answer (``max_task_retries``) without the agent seeing a failure, so the trace holds
  no failure and no retry; at most ``no-edge`` fallbacks, steps routed by the new actor before the
  edges registered again (counted in the evidence, not proof). Such a round counts when the
  request was still in flight once the actor was back and the edges had registered again. The
  table and the JSON keep these rounds apart from the trace-confirmed ones.

Every request must be answered (200). A round that fails (a timeout, an error) is recorded with
its kind and message, the cluster is brought back (frozen nodes continued, dead edges restarted)
and the run goes on; if it cannot be brought back, the run stops (``aborted`` says why). The JSON
(bench/results/faults.json) is written after every round.

What it expects of the cluster:
- two local edge nodes started by ``hera up`` on this machine (their pids and addresses are in its
  state file). A restarted edge gets the flags ``hera up`` gave it (``hera_ray.cluster.local_edge_args``:
  the cluster's TLS files; the busy node is found over TLS too when the cluster dials edges so).
- no generation cache (``hera up --generation-cache``): every round asks the same question at
  temperature 0, so from the second round on the edges would answer its steps from the cache,
  with nothing in flight to strike. The script refuses such a cluster.
- ``edge_freeze`` holds the node frozen until the request is answered or ``agent.edge_timeout_s``
  (read from the settings ``hera up`` recorded; 60 s by default) plus 10 s have passed: the step
  fails on the frozen node only at that timeout. Each freeze round costs about that long (about
  3.5 minutes for 3 rounds at the default). A cluster started with a shorter timeout
  (``HERA_AGENT__EDGE_TIMEOUT_S=20 hera up --local-edges 2``) is quicker, but a step slower than it
  (a loaded box, a long step) is then re-routed as if its node had frozen.

    python bench/faults.py [--rounds 3] [--faults edge_kill,edge_freeze,actor_kill,replica_kill] [--url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
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
#: How long past ``agent.edge_timeout_s`` a frozen node is held, for the agent to re-route the step.
FREEZE_MARGIN_S = 10.0


class Cluster:
    def __init__(self, url: str):
        from hera_ray import cluster
        from hera_ray.config import AgentConfig, HeraConfig

        self.url = url
        self.state = cluster.attach()  # a Ray driver, to kill actors
        self.expected = len(self.state.edge_pids)
        #: The settings ``hera up`` deployed the cluster with (None: it recorded none).
        self.config = HeraConfig.model_validate(self.state.config) if self.state.config else None
        self.edge_timeout_s = (self.config.agent if self.config else AgentConfig()).edge_timeout_s
        self.tls = self.config.scheduler.tls if self.config else None
        #: Edges restarted by a fault serve the model the scheduler places work on.
        self.edge_model = self.health().get("edge_model") or "qwen2.5-coder-0.5b"
        self.pool = ThreadPoolExecutor(8)
        self.future = None  # the current round's request
        self.struck = ""  # the node the current round struck

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
        self.future = self.pool.submit(httpx.post, f"{self.url}/v1/agent/runs", timeout=900,
                                       json={"question": QUESTION, "policy": policy, "request_id": tag})
        return self.future

    def busy_edge(self, timeout_s: float = 300) -> int:
        """The index of the edge node generating a step now (the one request in flight is on it)."""
        import grpc

        from hera_ray.wire import edge_load

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, address in enumerate(self.state.edge_addresses):
                try:
                    if edge_load(address, tls=self.tls).in_flight > 0:
                        return i
                except grpc.RpcError:
                    continue
            time.sleep(0.02)
        raise TimeoutError(f"no edge node started the request's step within {timeout_s:.0f}s")

    def edge(self, i: int) -> tuple[int, str]:
        return self.state.edge_pids[i], self.state.edge_addresses[i]

    def restart_edge(self, i: int) -> None:
        """Start edge ``i`` again as ``hera up`` started it: same node id, port and flags."""
        from hera_ray.cluster import _save_state, local_edge_args
        from hera_ray.launcher import start_edge
        from hera_ray.models import cache_dir

        proc = start_edge(cache_dir() / "cluster" / "logs", f"edge-{i}", self.state.registry, Path(self.state.token_file),
                          model=self.edge_model, port=int(self.state.edge_addresses[i].rsplit(":", 1)[1]),
                          extra_args=local_edge_args(self.config) if self.config else [], detach=True)
        self.state.edge_pids[i] = proc.pid
        _save_state(self.state)  # so `hera down` stops the new process

    def recover(self, timeout_s: float = 300) -> None:
        """After a failed round: continue any frozen edge, restart any dead one, wait for all up."""
        import psutil

        for i, pid in enumerate(self.state.edge_pids):
            try:  # a killed edge this script started is a zombie until reaped: dead all the same
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if alive:
                os.kill(pid, signal.SIGCONT)
            else:
                self.restart_edge(i)
        self.wait(lambda: self.nodes_up() == self.expected, timeout_s)


def edge_kill(c: Cluster, tag: str) -> dict:
    c.in_flight_request("all-slm", tag)
    i = c.busy_edge()
    c.struck = f"edge-{i}"  # on record even if the round fails after this
    pid, _ = c.edge(i)
    os.kill(pid, signal.SIGKILL)
    down = c.wait(lambda: c.nodes_up() == c.expected - 1)
    t0 = time.monotonic()
    c.restart_edge(i)  # a new process: loads the model, serves, registers
    c.wait(lambda: c.nodes_up() == c.expected)
    back = time.monotonic() - t0
    return {"marked_down_s": down, "restarted_and_up_s": back}


def edge_freeze(c: Cluster, tag: str) -> dict:
    """SIGSTOP the busy node and hold it: its step fails there only at ``agent.edge_timeout_s``,
    and must be retried elsewhere before SIGCONT (else it finishes on the same node)."""
    future = c.in_flight_request("all-slm", tag)
    i = c.busy_edge()
    c.struck = f"edge-{i}"  # on record even if the round fails after this
    pid, _ = c.edge(i)
    t0 = time.monotonic()
    try:
        os.kill(pid, signal.SIGSTOP)  # inside the try: SIGCONT follows whatever happens next
        down = c.wait(lambda: c.nodes_up() == c.expected - 1)
        hold = c.edge_timeout_s + FREEZE_MARGIN_S
        while not future.done() and time.monotonic() - t0 < hold:
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    frozen = time.monotonic() - t0
    back = c.wait(lambda: c.nodes_up() == c.expected)
    return {"marked_down_s": down, "frozen_s": frozen, "up_after_sigcont_s": back}


def actor_kill(c: Cluster, tag: str) -> dict:
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
    # Still in flight once the new actor is back and the edges registered: it crossed the restart.
    c.struck = "scheduler" if not future.done() else ""
    return measures


def replica_kill(c: Cluster, tag: str) -> dict:
    import ray
    from ray import serve

    from cloud_node.deployment import DEPLOYMENT_NAME

    c.in_flight_request("all-llm", tag)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=c.state.app_name)
    deadline = time.monotonic() + 300
    while handle.load.remote().result(timeout_s=60).get("in_flight", 0) == 0:  # until the replica is generating
        if time.monotonic() > deadline:
            raise TimeoutError("the cloud replica never started the request's step")
        time.sleep(0.05)
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA") and f"#{DEPLOYMENT_NAME}#" in a["name"]][:1]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    c.struck = "cloud"
    t0 = time.monotonic()
    handle.load.remote().result(timeout_s=600)  # answered by the replacement
    return {"replaced_and_answering_s": time.monotonic() - t0}


def met_fault(name: str, run: dict, struck: str) -> tuple[str, str]:
    """(met_by, evidence): how the answered request shows it met the fault, ``("", "")`` if nothing
    does. met_by is ``trace`` (the trace shows the failure and the retry) or, for ``actor_kill``,
    whose failure and retry the trace cannot show, ``timing`` (in flight across the restart)."""
    trace = run.get("trace", [])
    if name in ("edge_kill", "edge_freeze"):
        hits = [t for t in trace if any(f.startswith(f"{struck}:") for f in t.get("failures", []))
                and t.get("node") != struck and t.get("retries", 0) >= 1]
        return ("trace", f"step {hits[0]['index']} failed on {struck}, retried on {hits[0]['node']}") if hits else ("", "")
    if name == "replica_kill":
        hits = [t for t in trace if any(f.startswith("cloud:") for f in t.get("failures", [])) and t.get("retries", 0) >= 1]
        return ("trace", f"step {hits[0]['index']}'s cloud call failed and was retried") if hits else ("", "")
    if name == "actor_kill" and struck:
        fallbacks = sum(t.get("fallback") == "no-edge" for t in trace)
        return "timing", (f"in flight across the restart (the trace cannot show Ray's retries); {fallbacks} step(s) "
                          "fell back to the cloud (no-edge)")
    return "", ""


# Each fault starts the round's request (``c.future``), strikes, records what it struck in ``c.struck``
# as soon as it strikes (so a round that fails later still names it), and returns its timings.
FAULTS = {"edge_kill": edge_kill, "edge_freeze": edge_freeze, "actor_kill": actor_kill, "replica_kill": replica_kill}


def run_round(c: Cluster, name: str, tag: str) -> tuple[dict | None, dict]:
    """One round of fault ``name``: (its measures, or None if it failed; its row). A round that fails
    records the failure (kind, message), brings the cluster back and still waits for its request."""
    c.future, c.struck = None, ""
    measures, failure = None, None
    try:
        measures = FAULTS[name](c, tag)
        c.wait(lambda: c.nodes_up() == c.expected)
    except Exception as e:  # noqa: BLE001 - a failed round is recorded, the run goes on
        failure = {"kind": type(e).__name__, "message": str(e)[:500]}
        measures = None  # a failed round's timings do not go into the figures
        try:
            c.recover()
        except Exception as e2:  # noqa: BLE001
            failure["recovery"] = f"{type(e2).__name__}: {str(e2)[:300]}"
    struck = c.struck  # the node the fault struck (set by the fault as soon as it strikes), if it got that far
    row: dict = {"request_id": tag, "struck": struck, "status": None, "met_fault": False, "met_by": "", "evidence": ""}
    if c.future is not None:
        try:
            reply = c.future.result(timeout=900)
            row["status"] = reply.status_code
            if reply.status_code == 200:
                row["met_by"], row["evidence"] = met_fault(name, reply.json(), struck) if failure is None else ("", "")
                row["met_fault"] = bool(row["met_by"])
            else:
                row["error"] = reply.text[:300]
        except Exception as e:  # noqa: BLE001 - the request itself got no answer: lost
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if failure is not None:
        row["failure"] = failure
    return measures, row


def report(args, samples: dict[str, list[dict]], rounds: dict[str, list[dict]], complete: bool) -> dict:
    """The results so far (written after every round)."""
    from hera_ray.eval.bench import git_commit

    rows = [x for rs in rounds.values() for x in rs]
    summary = {name: {k: {"median": round(statistics.median(s[k] for s in ms), 2), "max": round(max(s[k] for s in ms), 2)}
                      for k in ms[0]} for name, ms in samples.items() if ms}
    return {"command": "python bench/faults.py " + " ".join(sys.argv[1:]), "commit": git_commit(ROOT),
            "rounds": args.rounds, "complete": complete, "summary": summary, "samples": samples,
            "requests": len(rows), "answered_200": sum(x["status"] == 200 for x in rows),
            # Rounds that met their fault, by what shows it: the trace (failure and retry), or only
            # timing (actor_kill: in flight across the restart; the trace cannot show Ray's retries).
            "rounds_met_fault": {n: {"trace": sum(x["met_by"] == "trace" for x in rs),
                                     "timing": sum(x["met_by"] == "timing" for x in rs), "of": len(rs)}
                                 for n, rs in rounds.items()},
            "failed_rounds": [{"fault": n, "request_id": x["request_id"], **x["failure"]}
                              for n, rs in rounds.items() for x in rs if "failure" in x],
            "rounds_detail": rounds,
            "other_statuses": [x["status"] for x in rows if x["status"] != 200],
            "error_samples": [x["error"] for x in rows if "error" in x][:5]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="ingress URL (default: $HERA_URL, else the cluster `hera up` started here)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    args = p.parse_args()
    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so a frozen node still gets its SIGCONT
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    from hera_ray.eval.bench import resolve_url

    console = Console()
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    if unknown := [n for n in names if n not in FAULTS]:
        sys.exit(f"unknown fault(s) {', '.join(unknown)}: choose from {', '.join(FAULTS)}")
    c = Cluster(resolve_url(args.url))
    health = c.health()
    if c.nodes_up() < 2:
        sys.exit(f"need a cluster with 2 local edge nodes up (`hera up --local-edges 2`); health: {health}")
    if health.get("generation_cache"):
        sys.exit(f"this cluster runs with a generation cache ({health['generation_cache']}): every round asks the same "
                 "question at temperature 0, so the edges would answer its steps from the cache with nothing in flight "
                 "to strike. Start one without it: `hera down && hera up --local-edges 2`")
    if c.config is None:
        console.print(f"[yellow]`hera up` recorded no settings: edge_freeze assumes agent.edge_timeout_s = "
                      f"{c.edge_timeout_s:.0f} s, and restarted edges get no TLS flags[/]")
    samples: dict[str, list[dict]] = {n: [] for n in names}
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    aborted = ""
    with Progress(console=console) as progress:
        task = progress.add_task("faults", total=len(names) * args.rounds)
        for r in range(args.rounds):
            for name in names:
                progress.update(task, description=name)
                measures, row = run_round(c, name, f"fault-{name}-{r}-{int(time.time())}")
                if measures is not None:
                    samples[name].append(measures)
                rounds[name].append(row)
                if "failure" in row:
                    progress.console.print(f"[red]{name} round {r + 1} failed[/]: {row['failure']['kind']}: "
                                           f"{row['failure']['message'][:200]}")
                if "recovery" in row.get("failure", {}):
                    # Not every node is back: later rounds would strike a broken cluster and measure nothing.
                    aborted = f"after {name} round {r + 1}: the cluster did not recover ({row['failure']['recovery']})"
                    break
                args.out.write_text(json.dumps(report(args, samples, rounds, complete=False), indent=2) + "\n")
                progress.advance(task)
            if aborted:
                break
    result = {**report(args, samples, rounds, complete=not aborted), **({"aborted": aborted} if aborted else {})}
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"fault recovery, {args.rounds} rounds each (seconds)")
    for col in ("fault", "measure", "median", "max", "met: trace", "met: timing only", "answered 200", "failed rounds"):
        table.add_column(col, justify="left" if col in ("fault", "measure") else "right")
    for name in names:
        rs, met = rounds[name], result["rounds_met_fault"][name]
        counts = (f"{met['trace']}/{met['of']}", f"{met['timing']}/{met['of']}",
                  f"{sum(x['status'] == 200 for x in rs)}/{met['of']}", str(sum('failure' in x for x in rs)))
        measures = result["summary"].get(name) or {"—": None}
        for j, (k, v) in enumerate(measures.items()):
            table.add_row(name, k, "—" if v is None else f"{v['median']:.2f}", "—" if v is None else f"{v['max']:.2f}",
                          *(counts if j == 0 else ("",) * len(counts)))
    console.print(table)
    rows = [x for rs in rounds.values() for x in rs]
    by_trace, by_timing = (sum(m[k] for m in result["rounds_met_fault"].values()) for k in ("trace", "timing"))
    failed = len(result["failed_rounds"])
    console.print(f"requests in flight during the faults: {result['answered_200']}/{len(rows)} answered 200; rounds that "
                  f"met their fault: {by_trace} shown by the trace (failure and retry), {by_timing} by timing only "
                  f"(actor_kill: in flight across the restart; its trace cannot show Ray's retries); {failed} failed")
    if aborted:
        console.print(f"[red]stopped {aborted}[/]")
    console.print(f"wrote {args.out}")
    ok = not aborted and result["answered_200"] == len(rows) and not failed and all(x["met_fault"] for x in rows)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
