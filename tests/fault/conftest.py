"""A real local cluster for the fault tests to break: a Ray head, the scheduler actor with its
EdgeRegistry on a fixed port (so a restarted actor serves it where the edges look), the Serve app
(ingress + cloud deployment) and two llama.cpp edge node processes the tests kill, freeze and
restart. SmolLM2-135M stands in as the cloud model to keep the suite inside CI's time."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hera_ray.launcher import LocalProcess, start_edge
from local_ray import free_port, ingress_health, local_ray_head, wait_nodes_up

EDGE_NAMES = ("edge-a", "edge-b")


@dataclass
class FaultCluster:
    url: str
    registry: str
    token_file: Path
    workdir: Path
    namespace: str
    app_name: str
    edges: dict[str, LocalProcess] = field(default_factory=dict)

    def health(self) -> dict:
        return ingress_health(self.url)

    def wait_nodes_up(self, n: int, timeout_s: float) -> float | None:
        """Seconds until the scheduler sees exactly ``n`` edge nodes up, or None on timeout."""
        return wait_nodes_up(self.url, n, timeout_s)

    def start_edge(self, name: str) -> LocalProcess:
        proc = start_edge(self.workdir, name, self.registry, self.token_file, extra_args=["--n-ctx", "1024"])
        self.edges[name] = proc
        return proc


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory):
    with local_ray_head(tmp_path_factory.mktemp("hera-cache")) as head:
        yield head


@pytest.fixture(scope="package")
def fault_cluster(ray_head, tmp_path_factory):
    from hera_ray.cluster import down, up
    from hera_ray.config import HeraConfig

    config = HeraConfig.model_validate({
        "cloud": {"model": "smollm2-135m", "model_id": "smollm2-as-cloud", "threads": 1, "n_ctx": 2048,
                  "num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        "scheduler": {"registry_port": free_port(), "heartbeat_interval_s": 1.0, "missed_heartbeats": 3,
                      "edge_model": "smollm2-135m"},
        # Steps end at a line end now, so several per request keep the nodes busy and a fault lands
        # mid-step; a short subtask timeout, so a frozen node is left soon.
        "agent": {"max_steps": 6, "max_tokens_per_step": 160, "edge_timeout_s": 6, "retry_backoff_s": 0.5},
        "ingress": {"port": free_port()},
        "hera": {"enabled": False},
    })
    state = up(config, local_edges=0, timeout_s=300, log=lambda m: None)
    cluster = FaultCluster(state.ingress_url, state.registry, Path(state.token_file),
                           tmp_path_factory.mktemp("edges"), config.namespace, config.app_name)
    yield cluster
    for proc in cluster.edges.values():
        proc.signal(signal.SIGCONT)
        proc.stop(10)
    down(log=lambda m: None)


@pytest.fixture
def cluster(fault_cluster):
    """The fault cluster with both edge nodes running and registered (restarted if a test killed one)."""
    for name in EDGE_NAMES:
        proc = fault_cluster.edges.get(name)
        if proc is not None:
            proc.signal(signal.SIGCONT)
        if proc is None or proc.popen.poll() is not None:
            fault_cluster.start_edge(name)
    assert fault_cluster.wait_nodes_up(len(EDGE_NAMES), 30) is not None, fault_cluster.health()
    yield fault_cluster
    for proc in fault_cluster.edges.values():
        proc.signal(signal.SIGCONT)
