"""Stopping a local Ray head (``hera down``, the test clusters) ends that cluster only: another Ray
cluster on the same machine keeps running and keeps answering."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from hera_ray.cluster import RAY_ENV, local_ray_temp_dir, start_local_ray, stop_local_ray
from local_ray import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def head_ports() -> dict:
    return {"port": free_port(), "client_port": free_port(), "dashboard_port": free_port(), "metrics_port": free_port()}


def answers(address: str) -> bool:
    """A fresh driver connects to the cluster at ``address`` and runs a task on it."""
    code = "import ray; ray.init(address=%r, log_to_driver=False); print(ray.get(ray.remote(lambda: 41 + 1).remote()))" % address
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    return out.stdout.strip().endswith("42")


def test_stopping_one_local_head_leaves_another_cluster_running():
    first = start_local_ray(num_cpus=1, object_store_bytes=80_000_000, **head_ports())
    second = start_local_ray(num_cpus=1, object_store_bytes=80_000_000, **head_ports())
    try:
        assert answers(first) and answers(second)
        stopped = stop_local_ray(first)
        assert stopped >= 3  # GCS, raylet, dashboard at least, plus the workers that ran the task
        with pytest.raises(OSError):  # its GCS port is closed
            socket.create_connection(('127.0.0.1', int(first.rpartition(':')[2])), timeout=2).close()
        assert answers(second), "stopping the first head took the second cluster down too"
        assert stop_local_ray(first) == 0  # nothing of it was left behind
    finally:
        stop_local_ray(first)
        stop_local_ray(second)
    assert local_ray_temp_dir(int(second.rpartition(":")[2])).name.startswith("hera-ray-")
