"""Estimators as Ray Serve deployments on CPU. Requests are batched with ``@serve.batch``: the
HERA policy asks several similarities per decision, and many agents decide at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from hera_ray.estimators.base import history_steps

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


# -- the HERA estimators -----------------------------------------------------------------------

ESTIMATOR_DEPLOYMENT = "HeraEstimators"


class EstimatorServer:
    """URC, HybridLLM, DP (MiniLM + LoRA, batched across callers), SP_SLM, SP_LLM, SD (llama.cpp
    adapters on the SLM, one context each) and SBERT, on one CPU replica.

    Arguments and results are plain data, so the policy in the scheduler actor reaches it through
    a handle (:class:`ServeEstimatorSet`) without importing torch.
    """

    def __init__(self, path: str | None = None, threads: int = 1):
        from hera_ray.estimators.trained import LocalEstimators

        self.path, self.threads = path, threads
        self.est = LocalEstimators(path, n_threads=threads)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config`` (a lightweight update, replica by
        replica): ``{"path": <estimator set>}`` loads that set beside the serving one and swaps it in,
        so no request is dropped (one in flight finishes on the set it started with)."""
        from hera_ray.estimators.trained import LocalEstimators

        path = (user_config or {}).get("path") or self.path
        if path == self.path:
            return
        self.est = await asyncio.to_thread(LocalEstimators, path, n_threads=self.threads)
        self.path = path

    async def serving(self) -> str | None:
        """The estimator set this replica serves."""
        return self.path

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def simple_prob(self, requests: list[tuple[str, str]]) -> list[float]:
        """Batched over (estimator name, question) pairs: P(simple) from ``urc`` or ``hybridllm``, P(strong
        wins) from ``routellm``."""
        out: list[float] = [0.0] * len(requests)
        for name in {n for n, _ in requests}:
            idx = [i for i, (n, _) in enumerate(requests) if n == name]
            for i, p in zip(idx, await asyncio.to_thread(self.est.simple_probs, name, [requests[i][1] for i in idx])):
                out[i] = p
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def distance(self, requests: list[tuple[str, list, str | None, list[float] | None]]) -> list[int | None]:
        """Batched over (question, steps so far, SLM's next subtask, its token log-probabilities or None) nodes."""
        nodes = [(q, [tuple(s) for s in steps], slm_next, logprobs) for q, steps, slm_next, logprobs in requests]
        return await asyncio.to_thread(self.est.distances_at, nodes)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def similarity(self, pairs: list[tuple[str, str]]) -> list[float]:
        return await asyncio.to_thread(self.est.sbert.similarities, pairs)

    async def predict_subtask(self, side: str, question: str, steps: list[tuple[str, str]], extra: list[str]) -> str:
        return await asyncio.to_thread(self.est.predict_subtask_sync, side, question, [tuple(s) for s in steps], tuple(extra))

    async def decompose(self, question: str, subtask: str) -> list[str]:
        return await asyncio.to_thread(self.est.decompose_sync, question, subtask)

    async def manifest(self) -> dict[str, Any]:
        return self.est.manifest

    async def check_health(self) -> None:
        self.est.sbert.similarities([("ok", "ok")])


def build_estimator_deployment(path: str | None = None, threads: int = 1, num_cpus: float = 0.5, replicas: int = 1,
                               options: dict[str, Any] | None = None, serving: str | None = None):
    """``path``: the set the replicas start with; ``serving``: the set they serve (a user_config,
    so changing it later is a lightweight update, :meth:`EstimatorServer.reconfigure`)."""
    opts = {"name": ESTIMATOR_DEPLOYMENT, "ray_actor_options": {"num_cpus": num_cpus}, "num_replicas": replicas,
            "max_ongoing_requests": 256, "user_config": {"path": serving or path}, **(options or {})}
    return serve.deployment(EstimatorServer, **opts).bind(path, threads)


class ServeEstimatorSet:
    """The policy's EstimatorSet over the estimator deployment's handle (found lazily by name)."""

    def __init__(self, app_name: str = "hera"):
        self.app_name = app_name
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            self._handle = serve.get_deployment_handle(ESTIMATOR_DEPLOYMENT, app_name=self.app_name)
        return self._handle

    async def request_simple_prob(self, question: str) -> float:
        return await self.handle.simple_prob.remote(("urc", question))

    async def hybrid_simple_prob(self, question: str) -> float:
        return await self.handle.simple_prob.remote(("hybridllm", question))

    async def strong_win_prob(self, question: str) -> float:
        return await self.handle.simple_prob.remote(("routellm", question))

    async def predict_subtask(self, side: str, ctx, extra: tuple[str, ...] = ()) -> str:
        return await self.handle.predict_subtask.remote(side, ctx.question, history_steps(ctx), list(extra))

    async def distance(self, ctx, slm_next: str | None = None, slm_logprobs=None) -> int | None:
        return await self.handle.distance.remote((ctx.question, history_steps(ctx), slm_next,
                                                  None if slm_logprobs is None else list(slm_logprobs)))

    async def decompose(self, subtask: str, ctx) -> list[str]:
        return await self.handle.decompose.remote(ctx.question, subtask)

    async def similarity(self, a: str, b: str) -> float:
        return await self.handle.similarity.remote((a, b))
