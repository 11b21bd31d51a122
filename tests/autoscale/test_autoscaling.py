"""Serve autoscales the cloud LLM for real: with ``target_ongoing_requests`` 1, a burst of all-llm runs
takes the deployment from 1 replica to 2, every run is answered, and once the load stops it goes
back to 1. What a user sees in ``serve status``."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cloud_node.deployment import replica_states

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = "Count from 1 to 40, one number per line, then say which of them are prime."


def running(app_name: str) -> int:
    return replica_states(app_name).get("RUNNING", 0)


def wait_for(predicate, timeout_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def test_cloud_replicas_scale_up_under_load_and_back_down(autoscale_cluster):
    app = autoscale_cluster.app_name
    assert wait_for(lambda: replica_states(app) == {"RUNNING": 1}, 60) is not None, replica_states(app)

    stop = threading.Event()
    replies: list[httpx.Response] = []
    seen = set()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():  # bounded: the test stops the load once scaled, or after 240 s
            r = httpx.post(f"{autoscale_cluster.ingress_url}/v1/agent/runs", timeout=300,
                           json={"question": QUESTION, "policy": "all-llm", "request_id": f"load-{i}-{n}"})
            replies.append(r)
            n += 1

    def sample() -> int:
        n = running(app)
        seen.add(n)
        return n

    def watch() -> None:
        while not stop.is_set():
            sample()
            time.sleep(0.25)

    pool = ThreadPoolExecutor(5)
    futures = [pool.submit(client, i) for i in range(4)] + [pool.submit(watch)]
    try:
        scaled_up = wait_for(lambda: sample() >= 2, 240)
    finally:
        stop.set()
        pool.shutdown(wait=True)
    for f in futures:  # a client thread that raised (a timeout, a dropped connection) fails the test
        f.result()
    assert len(replies) >= 4, f"only {len(replies)} request(s) answered under load"
    assert scaled_up is not None, f"never reached 2 running replicas under load; states {replica_states(app)}"
    assert 2 in seen and max(seen) <= 2, seen  # max_replicas holds
    assert replies and all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    for r in replies:
        run = r.json()
        assert run["answer"] and all(step["placement"] == "cloud" for step in run["trace"]), run

    # Load over: Serve drains the extra replica after downscale_delay_s and keeps min_replicas.
    assert wait_for(lambda: replica_states(app) == {"RUNNING": 1}, 120) is not None, replica_states(app)
    r = httpx.post(f"{autoscale_cluster.ingress_url}/v1/agent/runs", timeout=300,
                   json={"question": "What is 2 + 2?", "policy": "all-llm", "max_steps": 1})
    assert r.status_code == 200 and r.json()["trace"][0]["placement"] == "cloud", r.text
