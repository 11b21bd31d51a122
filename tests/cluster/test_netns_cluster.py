"""A real multi-host run on one machine (scripts/netns-cluster.sh): a Ray head and a Ray cloud worker
in their own network namespaces, two edge boxes (not Ray nodes) that register over their veth
addresses, and a client in the root namespace. What a user sees: Ray's two nodes, both edges in the
registry, requests routed across the hosts, an edge link cut and its work re-routed, the link restored
and the edge back at work; `ray job submit` and `ray://` from outside the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netns import BIN, CLOUD, EDGES, HEAD, INGRESS, REGISTRY, WORKDIR, user_env

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def python(code: str, timeout: float = 180) -> str:
    """Run ``code`` in a fresh interpreter with a user's environment; return its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=user_env(), timeout=timeout)
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_ray_joins_the_head_and_the_cloud_worker_across_hosts(cluster):
    # Over Ray Client from outside the cluster: the two Ray nodes are the head and cloud hosts, and
    # the cluster's parts sit where they should: the scheduler actor on the head (pinned there), the
    # cloud LLM replica on the cloud worker (its custom resource).
    out = python(f"""
import json, ray
from ray.util.state import list_actors
ray.init("ray://{HEAD}:10001")
nodes = [{{"ip": n["NodeManagerAddress"], "resources": n["Resources"]}} for n in ray.nodes() if n["Alive"]]
ips = {{n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}}
actors = {{a.class_name: ips.get(a.node_id) for a in list_actors(address="http://{HEAD}:8265", filters=[("state", "=", "ALIVE")])}}
print(json.dumps({{"nodes": nodes, "actors": actors}}))
""")
    seen = json.loads(out.strip().splitlines()[-1])
    by_ip = {n["ip"]: n["resources"] for n in seen["nodes"]}
    assert set(by_ip) == {HEAD, CLOUD}, by_ip
    assert "node:__internal_head__" in by_ip[HEAD] and by_ip[CLOUD].get("cloud") == 4
    assert seen["actors"]["SubtaskScheduler"] == HEAD
    assert seen["actors"]["ServeReplica:hera:CloudLLM"] == CLOUD


def test_the_edges_register_at_their_own_addresses(cluster):
    health = cluster.health()
    assert health["registry"] == REGISTRY and health["nodes_up"] == 2, health
    nodes = cluster.nodes()
    assert {n: (v["address"], v["state"]) for n, v in nodes.items()} == {
        host: (f"{ip}:50061", "up") for host, ip in EDGES.items()}


def test_a_request_runs_across_the_hosts(cluster):
    slm = ok(cluster.run("all-slm", max_steps=2))
    assert slm["trace"] and all(t["placement"] == "edge" and t["node"] in EDGES for t in slm["trace"]), slm["trace"]
    llm = ok(cluster.run("all-llm", max_steps=2))
    assert llm["trace"] and all(t["placement"] == "cloud" and t["node"] == "cloud" for t in llm["trace"]), llm["trace"]
    assert all(t["retries"] == 0 for t in slm["trace"] + llm["trace"])


def test_requests_are_spread_over_both_edges(cluster):
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda i: ok(cluster.run("random" if i % 2 else "all-slm", f"spread-{i}", max_steps=2)),
                             range(8)))
    used = {t["node"] for run in runs for t in run["trace"] if t["placement"] == "edge"}
    assert used == set(EDGES), used
    assert all(run["request_id"] == f"spread-{i}" for i, run in enumerate(runs))


def wait_busy(cluster, host: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cluster.in_flight(host) > 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"{host} never started a subtask")


def test_an_edge_link_cut_reroutes_its_work_and_the_edge_rejoins(cluster):
    rerouted, round_ = [], 0
    while not rerouted and round_ < 3:  # a subtask may finish in the instant before the cut: try again
        round_ += 1
        cluster.link("edge1", "up")
        assert cluster.wait_nodes_up(2, 60) is not None
        pool = ThreadPoolExecutor(4)
        futures = [pool.submit(cluster.run, "all-slm", f"cut{round_}-{i}") for i in range(4)]
        pool.shutdown(wait=False)
        wait_busy(cluster, "edge1")
        t0 = time.monotonic()
        cluster.link("edge1", "down")
        # The registry marks it down after its missed heartbeats (1 s x 3).
        assert cluster.wait_nodes_up(1, 30) is not None, cluster.health()
        marked_down_s = time.monotonic() - t0
        assert cluster.nodes()["edge1"]["state"] == "down"
        runs = [ok(f.result(timeout=300)) for f in futures]  # none fails
        rerouted = [t for run in runs for t in run["trace"] if any(f.startswith("edge1:") for f in t["failures"])]
    assert rerouted, "no subtask in flight on edge1 was re-routed"
    for t in rerouted:
        assert t["node"] == "edge2" and t["retries"] >= 1, t
        assert "UNAVAILABLE" in t["failures"][0] and "198.18.77.11:50061" in t["failures"][0], t["failures"]
    assert marked_down_s < 10

    # While the link is down, new work runs on edge2 only, with nothing to retry.
    with ThreadPoolExecutor(2) as pool:
        after = [ok(r) for r in pool.map(lambda i: cluster.run("all-slm", f"after-{i}", max_steps=2), range(2))]
    assert all(t["node"] == "edge2" and not t["failures"] for run in after for t in run["trace"]), after

    # The link back: the edge's next heartbeat brings it back, and it takes work again.
    cluster.link("edge1", "up")
    assert cluster.wait_nodes_up(2, 30) is not None, cluster.health()
    assert cluster.nodes()["edge1"]["state"] == "up"
    used = set()
    for attempt in range(4):
        with ThreadPoolExecutor(3) as pool:
            runs = [ok(r) for r in pool.map(lambda i: cluster.run("all-slm", f"back{attempt}-{i}", max_steps=2), range(3))]
        used |= {t["node"] for run in runs for t in run["trace"]}
        if "edge1" in used:
            break
    assert "edge1" in used, used


def test_ray_job_submit_runs_hera_bench_on_the_cluster(cluster):
    out_dir = WORKDIR / "test-bench-job"
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", f"http://{HEAD}:8265", "--",
         "hera", "bench", "--url", INGRESS, "--dataset", "gsm8k", "--n", "1", "--policies", "all-slm",
         "--max-steps", "2", "--no-ablations", "--fresh", "--out", str(out_dir)],
        capture_output=True, text=True, env=user_env(), timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "succeeded" in proc.stdout + proc.stderr
    result = json.loads((out_dir / "gsm8k.json").read_text())  # the job ran on the head; same disk here
    assert "all-slm" in json.dumps(result)


def test_submit_over_ray_client(cluster):
    # hera_ray.submit sets RAY_AUTH_MODE=token itself: a user needs only the token file.
    env_code = "import os; os.environ.pop('RAY_AUTH_MODE', None)\n"
    out = python(env_code + f"""
import json
from hera_ray import submit
run = submit("What is 17 * 3?", policy="all-slm", address="ray://{HEAD}:10001", max_steps=2)
print(json.dumps({{"answer": run["answer"], "nodes": [t["node"] for t in run["trace"]]}}))
""")
    run = json.loads(out.strip().splitlines()[-1])
    assert run["answer"] and run["nodes"] and set(run["nodes"]) <= set(EDGES), run
