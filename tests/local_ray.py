"""A Ray head on loopback with free ports, for the test packages that need a real local cluster
(tests/serving, tests/fault, tests/autoscale). Stopping it ends that cluster's processes only, so a
cluster started by ``hera up`` (or another test run) on the same machine is left alone.

A Serve handle made in the test process outlives the cluster it was made for: Serve runs every
handle's router on one loop per process, and a later package's first handle call then waits on it
(10 minutes here). A test that makes a handle shuts it down (``handle.shutdown()``) before its
cluster goes away, or reaches the cluster over HTTP or from a process of its own (``ray://``)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from hera_ray.cluster import LOCAL_RAY_ENV, RAY_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray_head(cache_dir: Path, env: dict[str, str] | None = None) -> Iterator[dict]:
    """Start a Ray head (``RAY_ADDRESS`` points at it and ``HERA_CACHE_DIR`` at ``cache_dir`` while
    it runs; ``env`` is added for its workers), yield its address and ports, then stop it."""
    saved = dict(os.environ)
    os.environ.update({**RAY_ENV, **LOCAL_RAY_ENV, **(env or {}), "HERA_CACHE_DIR": str(cache_dir)})
    from hera_ray.cluster import start_local_ray, stop_local_ray

    ports = {"port": free_port(), "client_port": free_port(), "dashboard_port": free_port(), "metrics_port": free_port()}
    address = start_local_ray(num_cpus=8, object_store_bytes=300_000_000, **ports)
    os.environ["RAY_ADDRESS"] = address
    try:
        yield {"address": address, **ports}
    finally:
        import ray

        ray.shutdown()
        stop_local_ray(address)
        os.environ.clear()
        os.environ.update(saved)


def ingress_health(url: str) -> dict:
    """The ingress's /healthz as JSON, or {} when it does not answer 200 (down, restarting)."""
    import httpx

    try:
        r = httpx.get(f"{url}/healthz", timeout=5)
        return r.json() if r.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def wait_nodes_up(url: str, n: int, timeout_s: float) -> float | None:
    """Seconds until the ingress at ``url`` reports exactly ``n`` edge nodes up, or None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ingress_health(url).get("nodes_up") == n:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None
