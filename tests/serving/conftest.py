"""A real local cluster for the serving-plane tests: a Ray head, the scheduler actor with its
EdgeRegistry, the Serve app (ingress + cloud LLM deployment) and two edge node processes.

SmolLM2-135M stands in as the cloud model here to keep the suite inside CI's time; the real
Qwen2.5-Coder-1.5B deployment is exercised in test_cloud_qwen.py.
"""

from __future__ import annotations

import pytest

from hera_ray.pricing import PriceSheet
from local_ray import local_ray_head
from serving_settings import (API_KEY, CLOUD_PRICE, VERIFY_CONFIDENCE_KEEP, free_port, write_keys_file,
                              write_verifier_file)


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory):
    """A Ray head on loopback with free ports; HERA_API_KEY is in its environment for the replicas, and
    HERA_EDGE_N_CTX for the edge nodes `hera up` starts (see ``cluster``)."""
    with local_ray_head(tmp_path_factory.mktemp("hera-cache"), {"HERA_API_KEY": API_KEY, "HERA_EDGE_N_CTX": "8192"}) as head:
        yield head


@pytest.fixture(scope="package")
def cluster(ray_head, tmp_path_factory):
    from hera_ray.cluster import down, up
    from hera_ray.config import HeraConfig

    # The limits the ingress publishes in its OpenAPI schema hold on this cluster (schemathesis sends their
    # boundary cases, test_schemathesis.py): its models' windows (the edges' from HERA_EDGE_N_CTX above)
    # take a 1000-message conversation or a step-mode call's largest max_tokens (agent.step_max_tokens_limit),
    # and a body with the longest string the schema allows, every character \u-escaped, fits the body limit.
    config = HeraConfig.model_validate({
        "cloud": {"model": "smollm2-135m", "model_id": "smollm2-as-cloud", "threads": 1, "n_ctx": 8192,
                  "num_cpus": 0.5, "prices": PriceSheet.flat(CLOUD_PRICE).model_dump(),
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        # SmolLM2 on the edges too: fast, and the tests check the plumbing, not the answers.
        "scheduler": {"registry_port": 0, "edge_model": "smollm2-135m"},
        "agent": {"max_steps": 3, "max_tokens_per_step": 64, "max_steps_limit": 3},
        "ingress": {"port": free_port(), "api_keys_file": str(write_keys_file(tmp_path_factory.mktemp("keys"))),
                    "max_body_bytes": 4 * 1024 * 1024},
        "verify": {"classifier": str(write_verifier_file(tmp_path_factory.mktemp("verifier"))),
                   "confidence_keep": VERIFY_CONFIDENCE_KEEP, "llm_accept": 0.5},
    })
    state = up(config, local_edges=2, timeout_s=300, log=lambda m: None)
    yield state
    down(log=lambda m: None)


@pytest.fixture
def client(cluster):
    from hera_ray.client import Client

    with Client(cluster.ingress_url) as c:
        yield c
