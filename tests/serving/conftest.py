"""A real local cluster for the serving-plane tests: a Ray head, the scheduler actor with its
EdgeRegistry, the Serve app (ingress + cloud LLM deployment) and two edge node processes.

SmolLM2-135M stands in as the cloud model here to keep the suite inside CI's time; the real
Qwen2.5-Coder-1.5B deployment is exercised in test_cloud_qwen.py.
"""

from __future__ import annotations

import os

import pytest

from hera_ray.cluster import LOCAL_RAY_ENV, RAY_ENV

from serving_settings import API_KEY, CLOUD_PRICE, free_port


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory):
    """A Ray head on loopback with free ports; HERA_API_KEY is in its environment for the replicas."""
    saved = dict(os.environ)
    os.environ.update({**RAY_ENV, **LOCAL_RAY_ENV, "HERA_API_KEY": API_KEY,
                       "HERA_CACHE_DIR": str(tmp_path_factory.mktemp("hera-cache"))})
    from hera_ray.cluster import start_local_ray

    ports = {"port": free_port(), "client_port": free_port(), "dashboard_port": free_port(), "metrics_port": free_port()}
    address = start_local_ray(num_cpus=8, object_store_bytes=300_000_000, **ports)
    os.environ["RAY_ADDRESS"] = address
    yield {"address": address, **ports}
    import ray

    from hera_ray.cluster import stop_local_ray

    ray.shutdown()
    stop_local_ray()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="package")
def cluster(ray_head):
    from hera_ray.cluster import down, up
    from hera_ray.config import HeraConfig

    config = HeraConfig.model_validate({
        "cloud": {"model": "smollm2-135m", "model_id": "smollm2-as-cloud", "threads": 1, "n_ctx": 2048,
                  "num_cpus": 0.5, "price_per_1k_tokens": CLOUD_PRICE,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        "scheduler": {"registry_port": 0},
        "agent": {"max_steps": 3, "max_tokens_per_step": 64},
        "ingress": {"port": free_port()},
    })
    state = up(config, local_edges=2, timeout_s=300, log=lambda m: None)
    yield state
    down(log=lambda m: None)


@pytest.fixture
def client(cluster):
    from hera_ray.client import Client

    with Client(cluster.ingress_url) as c:
        yield c
