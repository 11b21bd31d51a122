"""The agent over real parts in process: the real Router (no Ray) and llama.cpp engines.

``RouterScheduler`` is the agent's Scheduler interface over a Router, as the SubtaskScheduler
actor is over Ray; ``EngineExecutor`` runs edge steps on one EdgeWorker per address and cloud
steps on another, as the cluster does over gRPC and Serve.
"""

from __future__ import annotations

from hera_ray.policy.base import Decision, PastStep, Placement, Policy, SubtaskContext
from hera_ray.scheduler.router import RouteRequest, Router, SubtaskReport


class RouterScheduler:
    def __init__(self, router: Router):
        self.router = router

    async def route(self, request, max_cloud_cost=None):
        req = RouteRequest.from_dict(request)
        return (await self.router.route(req, max_cloud_cost)).to_dict()

    async def report(self, report):
        return self.router.report(SubtaskReport.from_dict(report))

    async def finish(self, request_id):
        return self.router.finish(request_id).to_dict()


class EngineExecutor:
    """Edge steps on ``edges[address]``, cloud steps on ``cloud``: EdgeWorkers (real llama.cpp)."""

    def __init__(self, edges, cloud):
        self.edges, self.cloud_worker, self.calls = edges, cloud, []

    async def edge(self, address, params):
        self.calls.append(("edge", params))
        return await self.edges[address].generate(params)

    async def cloud(self, params):
        self.calls.append(("cloud", params))
        return await self.cloud_worker.generate(params)


class Alternate(Policy):
    """Even steps on the edge, odd ones in the cloud: every step switches model."""

    name = "alternate"
    description = "Even steps on the edge, odd steps in the cloud."

    async def decide(self, ctx: SubtaskContext) -> Decision:
        return Decision(Placement.EDGE if ctx.index % 2 == 0 else Placement.CLOUD, self.name)
