"""Estimators as Ray Serve deployments on CPU. Requests are batched with ``@serve.batch``: the
HERA policy asks several similarities per decision, and many agents decide at once.
"""

from __future__ import annotations

from typing import Any

from ray import serve

SIMILARITY_DEPLOYMENT = "SbertSimilarity"


class SimilarityServer:
    """SBERT cosine similarity; each call is one (a, b) pair, batched across callers."""

    def __init__(self, model: str = "minilm-l6"):
        from hera_ray.estimators.similarity import SbertSimilarity

        self.sbert = SbertSimilarity(model)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def similarity(self, pairs: list[tuple[str, str]]) -> list[float]:
        return self.sbert.similarities(pairs)

    async def check_health(self) -> None:
        self.sbert.similarities([("ok", "ok")])


def build_similarity_deployment(model: str = "minilm-l6", options: dict[str, Any] | None = None):
    opts = {"name": SIMILARITY_DEPLOYMENT, "ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 256,
            **(options or {})}
    return serve.deployment(SimilarityServer, **opts).bind(model)
