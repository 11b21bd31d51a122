"""Adapters the agent loop runs on inside the cluster: the scheduler actor and the executors
that call edge nodes (gRPC) and the cloud deployment (Serve handle)."""

from __future__ import annotations

from typing import Any

import grpc

from hera_ray.errors import Unavailable, error_from_dict
from hera_ray.generation import GenerationParams, GenerationResult
from hera_ray.tls import TLSFiles, channel as tls_channel, check as check_tls
from hera_ray.wire import (edge_pb2_grpc, error_from_rpc, grpc_options, keepalive_options, params_to_pb, reconnect_options,
                           result_from_pb)


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

    def __init__(self, cloud_handle, timeout_s: float = 600.0, max_message_bytes: int = 4 * 1024 * 1024,
                 edge_timeout_s: float | None = None, tls: TLSFiles | None = None):
        self.cloud_handle = cloud_handle
        # Edge nodes are dialled over TLS when tls.ca_file is set (mTLS: presenting tls.cert_file).
        check_tls(tls, "scheduler.tls.")
        self.tls = tls
        self.timeout_s = timeout_s
        #: An edge call past this is taken as a frozen node (DEADLINE_EXCEEDED: re-routed).
        self.edge_timeout_s = edge_timeout_s or timeout_s
        # Keepalive: a subtask in flight on a node whose link is cut fails within seconds and is re-routed.
        self._options = grpc_options(max_message_bytes) + reconnect_options() + keepalive_options()
        self._stubs: dict[str, edge_pb2_grpc.EdgeWorkerStub] = {}

    def _stub(self, address: str) -> edge_pb2_grpc.EdgeWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:  # one channel per node, reused by every request
            channel = tls_channel(address, self.tls, options=self._options, prefix="scheduler.tls.")
            stub = self._stubs[address] = edge_pb2_grpc.EdgeWorkerStub(channel)
        return stub

    async def edge(self, address: str, params: GenerationParams) -> GenerationResult:
        try:
            reply = await self._stub(address).Generate(params_to_pb(params), timeout=self.edge_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, f"edge node at {address}") from None
        return result_from_pb(reply)

    async def cloud(self, params: GenerationParams) -> GenerationResult:
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            out = await self.cloud_handle.generate.remote(params.to_dict())
        except (RayActorError, ActorUnavailableError) as e:
            # The replica died (or is unreachable) under this call; Serve replaces it, the agent retries.
            raise Unavailable(f"cloud replica failed during the call ({type(e).__name__}): {str(e).splitlines()[0][:300]}") from None
        if "error" in out:
            raise error_from_dict(out["error"])
        return GenerationResult(**out)
