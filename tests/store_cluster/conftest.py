"""A real local cluster whose store the tests break and bring back: the scheduler actor is killed
mid-run, and the whole app goes down and comes up again, on SQLite and on a real PostgreSQL server.
SmolLM2-135M runs on both sides (the tests check what is kept, not the answers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hera_ray.pricing import PriceSheet
from local_ray import free_port, local_ray_head
from pg_server import started_server

CLOUD_PRICE = 0.002  # USD per 1k tokens
SPENDER_KEY = "test-spender-0123456789"
#: A budget two all-llm runs of 3 short steps (each ~100-200 tokens) cannot finish inside, so a
#: test can spend, restart, and see the key refused past it.
SPENDER_BUDGET = 0.0012
READER_KEY = "test-reader-0123456789"


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory):
    with local_ray_head(tmp_path_factory.mktemp("hera-cache")) as head:
        yield head


@pytest.fixture(scope="package")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(f"- {{name: spender, key: {SPENDER_KEY}, cloud_budget: {SPENDER_BUDGET:f}}}\n"
                    f"- {{name: reader, key: {READER_KEY}}}\n")
    return path


@pytest.fixture(scope="package")
def ingress_port() -> int:
    """One port for every cluster of the package: Serve's HTTP proxy outlives `hera down` on a Ray
    head `hera up` did not start, and keeps its first port."""
    return free_port()


@pytest.fixture(scope="package")
def pg():
    server = started_server()
    yield server
    server.close()


def cluster_config(keys_file: Path, store_url: str | None, registry_port: int, ingress_port: int):
    from hera_ray.config import HeraConfig

    return HeraConfig.model_validate({
        "cloud": {"model": "smollm2-135m", "model_id": "smollm2-as-cloud", "threads": 1, "n_ctx": 2048,
                  "num_cpus": 0.5, "prices": PriceSheet.flat(CLOUD_PRICE).model_dump(),
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        # A fixed registry port: a restarted actor serves it where the edge looks.
        "scheduler": {"registry_port": registry_port, "edge_model": "smollm2-135m"},
        "agent": {"max_steps": 3, "max_tokens_per_step": 48, "max_steps_limit": 3},
        "ingress": {"port": ingress_port, "api_keys_file": str(keys_file)},
        "hera": {"enabled": False},
        "store": {"url": store_url, "retry_max_s": 0.5},
    })
