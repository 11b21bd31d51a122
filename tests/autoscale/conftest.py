"""A real local cluster whose cloud deployment autoscales quickly: 1 to 2 replicas with a low
``target_ongoing_requests`` and short delays, so a test sees Serve scale up under load and back down
when it stops. SmolLM2-135M stands in as the cloud model to keep the suite inside CI's time."""

from __future__ import annotations

import pytest

from local_ray import free_port, local_ray_head

# What the test asks of Serve: past 1 ongoing request per replica, add one (up to 2) after 1 s;
# with no load, drop back to 1 after 4 s.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="package")
def autoscale_cluster(tmp_path_factory):
    from hera_ray.cluster import down, up
    from hera_ray.config import HeraConfig

    with local_ray_head(tmp_path_factory.mktemp("hera-cache")):
        config = HeraConfig.model_validate({
            "cloud": {"model": "smollm2-135m", "model_id": "smollm2-as-cloud", "threads": 1, "n_ctx": 1024,
                      "num_cpus": 0.5, "autoscaling": AUTOSCALING},
            "scheduler": {"registry_port": 0, "edge_model": "smollm2-135m"},
            "agent": {"max_steps": 3, "max_tokens_per_step": 96},
            "ingress": {"port": free_port()},
            "hera": {"enabled": False},
        })
        state = up(config, local_edges=0, timeout_s=300, log=lambda m: None)
        try:
            yield state
        finally:
            down(log=lambda m: None)
