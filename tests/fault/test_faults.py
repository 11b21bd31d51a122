"""Faults survived, for real: an edge node killed (SIGKILL) or frozen (SIGSTOP) mid-subtask, the
scheduler actor killed (and with it the EdgeRegistry it runs), a cloud replica killed. Each ends
with every request answered, once, with its own id. Where an edge or a replica died, the traces
show the failed attempt and its retry; where the scheduler actor died, Ray retried its calls
(``max_task_retries``), so no step failed: a step routed before the edges registered with the new
actor ran on the cloud, marked ``no-edge``, and the ledger, restored from the store, counts each
step once.

The registry restarting on its own (``hera registry serve``) is tests/test_registry.py's
``test_nodes_register_again_after_a_registry_restart``; here it restarts inside the actor.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from hera_ray.wire import edge_load

pytestmark = pytest.mark.timeout(600)

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def submit(url: str, n: int, policy: str, tag: str) -> dict[str, Future]:
    pool = ThreadPoolExecutor(n)
    futures = {f"{tag}-{i}": pool.submit(httpx.post, f"{url}/v1/agent/runs", timeout=600,
                                         json={"question": QUESTION, "policy": policy, "request_id": f"{tag}-{i}"})
               for i in range(n)}
    pool.shutdown(wait=False)
    return futures


def answered(futures: dict[str, Future]) -> dict[str, dict]:
    """Every request got one 200 answer carrying its own id."""
    runs = {}
    for request_id, future in futures.items():
        reply = future.result(timeout=600)
        assert reply.status_code == 200, (request_id, reply.text)
        run = reply.json()
        assert run["request_id"] == request_id and run["trace"], run
        runs[request_id] = run
    return runs


def in_flight(address: str) -> int:
    return edge_load(address).in_flight


def wait_busy_edge(cluster, timeout_s: float = 120):
    """The first edge node seen generating a subtask."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in cluster.edges.values():
            if proc.popen.poll() is None and in_flight(proc.address) > 0:
                return proc
        time.sleep(0.05)
    raise AssertionError("no edge node started a subtask")


def retried_off(runs: dict[str, dict], node: str) -> list[dict]:
    """Trace entries that failed on ``node`` and then ran elsewhere."""
    return [t for run in runs.values() for t in run["trace"] if any(f.startswith(f"{node}:") for f in t["failures"])]


def test_an_edge_node_killed_mid_subtask_has_its_subtask_rerun_elsewhere(cluster):
    futures = submit(cluster.url, 4, "all-slm", "kill")
    victim = wait_busy_edge(cluster)
    victim.popen.kill()
    victim.popen.wait(10)
    runs = answered(futures)
    moved = retried_off(runs, victim.name)
    assert moved, "no subtask shows a retry off the killed node"
    for t in moved:
        assert t["node"] != victim.name and t["retries"] >= 1
        assert "UNAVAILABLE" in t["failures"][0]
    assert cluster.wait_nodes_up(1, 10) is not None  # missed heartbeats: marked down


def test_a_frozen_edge_node_is_marked_down_its_work_rerouted_and_it_rejoins(cluster):
    futures = submit(cluster.url, 3, "all-slm", "freeze")
    victim = wait_busy_edge(cluster)
    victim.signal(signal.SIGSTOP)
    try:
        assert cluster.wait_nodes_up(1, 10) is not None, "the frozen node was not marked down"
        runs = answered(futures)
    finally:
        victim.signal(signal.SIGCONT)
    moved = retried_off(runs, victim.name)
    assert moved and all("DEADLINE_EXCEEDED" in t["failures"][0] and t["node"] != victim.name for t in moved)
    assert cluster.wait_nodes_up(2, 10) is not None, "the node did not rejoin after SIGCONT"
    rerun = httpx.post(f"{cluster.url}/v1/agent/runs", json={"question": QUESTION, "policy": "all-slm"}, timeout=300)
    assert rerun.status_code == 200


def test_a_killed_scheduler_actor_is_restarted_and_the_edges_register_again(cluster):
    import ray

    from hera_ray.scheduler.actor import SCHEDULER_NAME

    def ledger_subtasks() -> int:
        actor = ray.get_actor(SCHEDULER_NAME, namespace=cluster.namespace)
        return ray.get(actor.usage.remote(), timeout=60)["total"]["subtasks"]

    before = cluster.health()["scheduler_started_at"]
    counted_before = ledger_subtasks()
    futures = submit(cluster.url, 3, "all-slm", "actor")
    wait_busy_edge(cluster)
    ray.kill(ray.get_actor(SCHEDULER_NAME, namespace=cluster.namespace), no_restart=False)
    deadline = time.monotonic() + 120
    while cluster.health().get("scheduler_started_at", before) == before:  # until the new actor answers
        assert time.monotonic() < deadline, "the scheduler actor did not come back"
        time.sleep(0.1)
    rejoined_s = cluster.wait_nodes_up(2, 5)
    assert rejoined_s is not None, f"edges did not register again within 5 s: {cluster.health()}"
    runs = answered(futures)  # in-flight requests went on through the new actor
    for run in runs.values():  # every step once, in order; none failed
        trace = run["trace"]
        assert [t["index"] for t in trace] == list(range(len(trace))), trace
        # A step routed before the edges registered with the new actor ran on the cloud, and says so.
        where = [(t["node"], t["fallback"], t["failures"]) for t in trace]
        assert all(not f and (n in cluster.edges and not fb or n == "cloud" and fb == "no-edge") for n, fb, f in where), where
    steps = sum(len(run["trace"]) for run in runs.values())
    assert ledger_subtasks() - counted_before == steps  # the restarted actor's ledger: none lost, none twice


def test_a_killed_cloud_replica_is_replaced_and_its_subtask_retried(cluster):
    import ray
    from ray import serve

    from cloud_node.deployment import DEPLOYMENT_NAME

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=cluster.app_name)
    futures = submit(cluster.url, 2, "all-llm", "cloud")
    deadline = time.monotonic() + 120
    try:
        while handle.load.remote().result(timeout_s=10).get("in_flight", 0) == 0:
            assert time.monotonic() < deadline, "the cloud replica never started a subtask"
            time.sleep(0.05)
    finally:
        # Stop this process's router for the handle: left running, it outlives this cluster and the
        # next package's first handle call waits on it (see tests/local_ray.py).
        handle.shutdown()
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA") and f"#{DEPLOYMENT_NAME}#" in a["name"]]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    runs = answered(futures)
    retried = [t for run in runs.values() for t in run["trace"] if t["failures"]]
    assert retried, "no subtask shows the retry after the replica died"
    assert all(f.startswith("cloud: cloud replica failed") for t in retried for f in t["failures"])
    assert all(t["placement"] == "cloud" for run in runs.values() for t in run["trace"])
