"""Adapters the agent loop runs on inside the cluster: the scheduler actor and the executors
that call edge nodes (gRPC) and the cloud deployment (Serve handle)."""

from __future__ import annotations

from typing import Any

import grpc

from hera_ray.errors import error_from_dict
from hera_ray.generation import GenerationParams, GenerationResult
from hera_ray.wire import edge_pb2_grpc, error_from_rpc, grpc_options, params_to_pb, result_from_pb


class ActorScheduler:
    """The agent's Scheduler interface over the SubtaskScheduler actor handle."""

    def __init__(self, actor):
        self.actor = actor

    async def route(self, request: dict[str, Any], max_cloud_cost: float | None = None) -> dict[str, Any]:
        return await self.actor.route.remote(request, max_cloud_cost)

    async def report(self, report: dict[str, Any]) -> float:
        return await self.actor.report.remote(report)

    async def finish(self, request_id: str) -> dict[str, Any]:
        return await self.actor.finish.remote(request_id)


class ClusterExecutor:
    """Runs a subtask on an edge node over gRPC or on the cloud deployment through its handle."""

    def __init__(self, cloud_handle, timeout_s: float = 600.0, max_message_bytes: int = 4 * 1024 * 1024):
        self.cloud_handle = cloud_handle
        self.timeout_s = timeout_s
        self._options = grpc_options(max_message_bytes)
        self._stubs: dict[str, edge_pb2_grpc.EdgeWorkerStub] = {}

    def _stub(self, address: str) -> edge_pb2_grpc.EdgeWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:  # one channel per node, reused by every request
            stub = self._stubs[address] = edge_pb2_grpc.EdgeWorkerStub(grpc.aio.insecure_channel(address, options=self._options))
        return stub

    async def edge(self, address: str, params: GenerationParams) -> GenerationResult:
        try:
            reply = await self._stub(address).Generate(params_to_pb(params), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, f"edge node at {address}") from None
        return result_from_pb(reply)

    async def cloud(self, params: GenerationParams) -> GenerationResult:
        out = await self.cloud_handle.generate.remote(params.to_dict())
        if "error" in out:
            raise error_from_dict(out["error"])
        return GenerationResult(**out)
