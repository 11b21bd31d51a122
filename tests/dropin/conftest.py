"""A real local cluster on the bundled Qwen pair for the drop-in tests: real agent frameworks
(the openai SDK, LangChain, pydantic-ai), unchanged, pointed at hera-ray's step mode.

Qwen2.5-Coder-0.5B on one edge node and Qwen2.5-Coder-1.5B as the cloud model: SmolLM2 (the
serving suite's stand-in) has no tools in its chat template. No HERA estimators are deployed;
the policies here are all-slm, all-llm, random and hera-verify (on its confidence alone).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dropin_settings import API_KEY, LLM, SLM
from local_ray import free_port, local_ray_head


def _link_joined_models(cache: Path) -> None:
    """The test cache gets links to the joined Qwen files (make install joins them once into the
    user's cache), so that edge processes and Ray workers resolve the bundled names without joining again."""
    from hera_ray.models import BUNDLED, resolve_model

    saved = os.environ.pop("HERA_CACHE_DIR", None)
    try:
        for name in (SLM, LLM):
            real = resolve_model(name).path
            (cache / "models").mkdir(parents=True, exist_ok=True)
            for suffix in ("", ".sha256"):
                link = cache / "models" / (BUNDLED[name].cache_name + suffix)
                if not link.exists():
                    link.symlink_to(Path(str(real) + suffix))
    finally:
        if saved is not None:
            os.environ["HERA_CACHE_DIR"] = saved


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hera-cache")
    _link_joined_models(cache)
    with local_ray_head(cache, {"HERA_API_KEY": API_KEY}) as head:
        yield head


@pytest.fixture(scope="package")
def cluster(ray_head):
    from hera_ray.cluster import down, up
    from hera_ray.config import HeraConfig

    config = HeraConfig.model_validate({
        "cloud": {"model": LLM, "threads": 1, "n_ctx": 4096, "num_cpus": 0.5,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        "scheduler": {"registry_port": 0, "edge_model": SLM},
        "hera": {"enabled": False},
        "ingress": {"port": free_port()},
        "agent": {"step_max_tokens": 160},
    })
    state = up(config, local_edges=1, timeout_s=600, log=lambda m: None)
    yield state
    down(log=lambda m: None)


@pytest.fixture
def base_url(cluster) -> str:
    return f"{cluster.ingress_url}/v1"
