"""EdgeRegistry: the grpc.aio server edge nodes dial to register, heartbeat and deregister.

It is a thin adapter over :class:`~hera_ray.scheduler.nodes.NodeTable`: it checks the bearer
token, converts messages, and runs a reaper that marks silent nodes down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from hera_ray.config import RegistryConfig, read_tokens
from hera_ray.errors import ConfigError
from hera_ray.scheduler.nodes import NodeRecord, NodeSpec, NodeState, NodeTable
from hera_ray import tls
from hera_ray.wire import (bearer_token, check_token, grpc_errors, load_from_pb, load_to_pb, prices_from_pb,
                           prices_to_pb_fields, registry_pb2, registry_pb2_grpc, server_options)

log = logging.getLogger(__name__)

SERVICE_NAME = "hera.v1.EdgeRegistry"

_STATE_TO_PB = {
    NodeState.UP: registry_pb2.NODE_STATE_UP,
    NodeState.DRAINING: registry_pb2.NODE_STATE_DRAINING,
    NodeState.DOWN: registry_pb2.NODE_STATE_DOWN,
}


def spec_from_pb(m: registry_pb2.NodeSpec) -> NodeSpec:
    return NodeSpec(
        node_id=m.node_id,
        address=m.address,
        model=m.model,
        n_ctx=m.n_ctx,
        slots=m.slots,
        max_queue=m.max_queue,
        prices=prices_from_pb(m),
        version=m.version,
    )


def status_to_pb(table: NodeTable, r: NodeRecord) -> registry_pb2.NodeStatus:
    s = r.spec
    return registry_pb2.NodeStatus(
        spec=registry_pb2.NodeSpec(
            node_id=s.node_id,
            address=s.address,
            model=s.model,
            n_ctx=s.n_ctx,
            slots=s.slots,
            max_queue=s.max_queue,
            **prices_to_pb_fields(s.prices),
            version=s.version,
        ),
        state=_STATE_TO_PB[r.state],
        load=load_to_pb(r.load),
        last_heartbeat_age_s=table.heartbeat_age(r),
        registered_at_unix=r.registered_at,
    )


class EdgeRegistryServicer(registry_pb2_grpc.EdgeRegistryServicer):
    def __init__(self, table: NodeTable, tokens: Sequence[str]):
        self.table = table
        self._tokens = list(tokens)

    def _token(self, context) -> str:
        return check_token(bearer_token(context), self._tokens)

    @grpc_errors
    async def Register(self, request, context):
        token = self._token(context)
        record = self.table.register(spec_from_pb(request.node), token)
        log.info("registered %s at %s (model %s, %d slots)", record.spec.node_id, record.spec.address,
                 record.spec.model, record.spec.slots)
        return registry_pb2.RegisterResponse(
            heartbeat_interval_s=self.table.heartbeat_interval_s,
            missed_heartbeats_allowed=self.table.missed_heartbeats,
        )

    @grpc_errors
    async def Heartbeat(self, request, context):
        token = self._token(context)
        self.table.heartbeat(request.node_id, load_from_pb(request.load), token, draining=request.draining)
        return registry_pb2.HeartbeatResponse()

    @grpc_errors
    async def Deregister(self, request, context):
        token = self._token(context)
        self.table.deregister(request.node_id, token)
        log.info("deregistered %s", request.node_id)
        return registry_pb2.DeregisterResponse()

    @grpc_errors
    async def ListNodes(self, request, context):
        self._token(context)
        return registry_pb2.ListNodesResponse(nodes=[status_to_pb(self.table, r) for r in self.table.nodes()])


class RegistryServer:
    """The registry's gRPC server plus its reaper task. ``await start()``, then ``await stop()``."""

    def __init__(self, config: RegistryConfig, table: NodeTable | None = None):
        if config.token_file is None:
            raise ConfigError("the registry needs --token-file: a file of accepted node tokens, one per line")
        self.config = config
        tls.check(config.tls)
        self.tokens = read_tokens(config.token_file)
        self.table = table if table is not None else NodeTable(config.heartbeat_interval_s, config.missed_heartbeats)
        self.server = grpc.aio.server(options=server_options(config.max_message_bytes))
        self.health = health_aio.HealthServicer()
        registry_pb2_grpc.add_EdgeRegistryServicer_to_server(EdgeRegistryServicer(self.table, self.tokens), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._reaper: asyncio.Task | None = None

    async def start(self) -> int:
        self.port = tls.add_port(self.server, f"{self.config.host}:{self.config.port}", self.config.tls)
        if self.port == 0:
            raise ConfigError(f"cannot bind the registry to {self.config.host}:{self.config.port}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reaper = asyncio.create_task(self._reap())
        log.info("edge registry listening on %s:%d", self.config.host, self.port)
        return self.port

    async def _reap(self) -> None:
        period = self.table.heartbeat_interval_s / 4
        while True:
            await asyncio.sleep(period)
            for node_id in self.table.expire():
                log.warning("node %s missed %d heartbeats: marked down", node_id, self.table.missed_heartbeats)

    async def stop(self, grace: float = 2.0) -> None:
        if self._reaper:
            self._reaper.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def serve(config: RegistryConfig, ready_message: bool = True) -> None:
    """Run the registry until SIGINT or SIGTERM."""
    server = RegistryServer(config)
    port = await server.start()
    if ready_message:
        secure = " over mTLS" if config.tls_client_auth else " over TLS" if config.tls.serves_tls else ""
        print(f"hera registry listening on {config.host}:{port}{secure}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
