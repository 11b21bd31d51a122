"""The edge node process: EdgeWorker over grpc.aio, health, registration, heartbeats, drain.

Lifecycle: load the model -> serve EdgeWorker and grpc.health.v1 -> register with the registry
(retrying while it is unreachable) -> heartbeat load every interval (re-registering if the
registry forgot the node) -> on SIGTERM or SIGINT drain: refuse new work, finish accepted work,
deregister, stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from hera_ray import __version__
from hera_ray.config import EdgeNodeConfig, read_tokens
from hera_ray.errors import ConfigError
from hera_ray.models import resolve_model
from hera_ray import tls
from hera_ray.wire import (auth_metadata, edge_pb2, edge_pb2_grpc, grpc_errors, grpc_options, keepalive_options, load_to_pb, reconnect_options, params_from_pb,
                           prices_to_pb_fields, registry_pb2, registry_pb2_grpc, server_options)

from edge_node.worker import EdgeWorker
from hera_ray.generation import GenerationResult

log = logging.getLogger(__name__)

SERVICE_NAME = "hera.v1.EdgeWorker"
# Registration errors that retrying cannot fix.
_FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
          grpc.StatusCode.INVALID_ARGUMENT}


class EdgeWorkerServicer(edge_pb2_grpc.EdgeWorkerServicer):
    def __init__(self, worker: EdgeWorker, config: EdgeNodeConfig):
        self.worker = worker
        self.config = config
        self.node_id = config.node_id or ""  # set at bind time when defaulted

    def _result_to_pb(self, r: GenerationResult) -> edge_pb2.GenerateResponse:
        return edge_pb2.GenerateResponse(
            text=r.text,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            ttft_s=r.ttft_s,
            decode_s=r.decode_s,
            queue_s=r.queue_s,
            finish_reason=r.finish_reason,
            model=self.worker.model_id,
            node_id=self.node_id,
            request_id=r.request_id,
            stop_reason=r.stop_reason,
            logprobs=r.logprobs or [],
            top_logprobs=r.top_logprobs or [],
            has_logprobs=r.logprobs is not None,
            cache_hit=r.cache_hit,
            segment_tokens=r.segment_tokens or [],
            rewritten_segment=r.rewritten_segment,
        )

    @grpc_errors
    async def Generate(self, request, context):
        return self._result_to_pb(await self.worker.generate(params_from_pb(request)))

    @grpc_errors
    async def GenerateStream(self, request, context):
        async for item in self.worker.stream(params_from_pb(request)):
            if isinstance(item, GenerationResult):
                yield edge_pb2.GenerateChunk(final=self._result_to_pb(item))
            else:
                yield edge_pb2.GenerateChunk(delta=item)

    @grpc_errors
    async def Info(self, request, context):
        return edge_pb2.InfoResponse(
            node_id=self.node_id,
            model=self.worker.model_id,
            n_ctx=self.worker.n_ctx,
            slots=len(self.worker.slots),
            max_queue=self.worker.max_queue,
            **prices_to_pb_fields(self.config.prices),
            draining=self.worker.draining,
            load=load_to_pb(self.worker.load()),
        )


class RegistrationError(RuntimeError):
    pass


class EdgeNode:
    """An edge node: ``await start()``, then ``await drain()`` (SIGTERM does it in ``serve``)."""

    def __init__(self, config: EdgeNodeConfig):
        self.config = config
        tls.check(config.tls)  # before the model loads: a bad TLS setup fails at once
        self.token = read_tokens(config.token_file)[0] if config.token_file else None
        if config.registry and not self.token:
            raise ConfigError("registering with a registry needs --token-file")
        model = resolve_model(config.model)
        self.model_id = config.model_id or model.model_id
        self.worker = EdgeWorker(
            model.path,
            self.model_id,
            n_ctx=config.n_ctx,
            slots=config.slots,
            max_queue=config.max_queue,
            threads=config.threads,
            generation_cache=config.generation_cache,
        )
        self.server = grpc.aio.server(options=server_options(config.max_message_bytes))
        self.health = health_aio.HealthServicer()
        self.servicer = EdgeWorkerServicer(self.worker, config)
        edge_pb2_grpc.add_EdgeWorkerServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self.node_id = config.node_id or ""  # set at bind time when defaulted
        self._heartbeats: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._registered = asyncio.Event()
        self.fatal: RegistrationError | None = None

    @property
    def address(self) -> str:
        return self.config.advertise_address or f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        self.port = tls.add_port(self.server, f"{self.config.host}:{self.config.port}", self.config.tls)
        if self.port == 0:
            raise ConfigError(f"cannot bind the edge node to {self.config.host}:{self.config.port}")
        # With --port 0 the port is known only now, and the default node id names it.
        self.node_id = self.servicer.node_id = self.config.node_id or f"{socket.gethostname()}-{self.port}"
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.registry:
            self._channel = tls.channel(self.config.registry, self.config.tls, options=grpc_options(self.config.max_message_bytes) + reconnect_options() + keepalive_options())
            self._stub = registry_pb2_grpc.EdgeRegistryStub(self._channel)
            self._heartbeats = asyncio.create_task(self._registration_loop())

    def _spec(self) -> registry_pb2.NodeSpec:
        return registry_pb2.NodeSpec(
            node_id=self.node_id,
            address=self.address,
            model=self.model_id,
            n_ctx=self.worker.n_ctx,
            slots=len(self.worker.slots),
            max_queue=self.worker.max_queue,
            **prices_to_pb_fields(self.config.prices),
            version=__version__,
        )

    async def _register(self) -> float:
        reply = await self._stub.Register(
            registry_pb2.RegisterRequest(node=self._spec()), metadata=auth_metadata(self.token), timeout=5
        )
        self._registered.set()
        log.info("registered with %s as %s", self.config.registry, self.node_id)
        return reply.heartbeat_interval_s or 1.0

    async def _registration_loop(self) -> None:
        interval = None
        backoff = 0.2
        while True:
            try:
                if interval is None:
                    interval = await self._register()
                    backoff = 0.2
                await asyncio.sleep(interval)
                await self._stub.Heartbeat(
                    registry_pb2.HeartbeatRequest(
                        node_id=self.node_id, load=load_to_pb(self.worker.load()), draining=self.worker.draining
                    ),
                    metadata=auth_metadata(self.token),
                    timeout=max(1.0, interval),
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in _FATAL:
                    self.fatal = RegistrationError(f"the registry at {self.config.registry} refused this node: {e.details()}")
                    log.error("%s", self.fatal)
                    self._registered.set()
                    return
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("the registry does not know this node (it restarted?): registering again")
                else:
                    log.warning("registry %s unreachable (%s: %s): retrying in %.1fs", self.config.registry, e.code().name,
                                e.details(), backoff)
                    await asyncio.sleep(backoff)
                    # Capped at a second: a restarted registry (or scheduler actor) must see us back
                    # within a few seconds, and one small call a second per node costs nothing.
                    backoff = min(backoff * 2, 1.0)
                interval = None

    async def wait_registered(self) -> None:
        await self._registered.wait()
        if self.fatal:
            raise self.fatal

    async def drain(self) -> None:
        """Refuse new work, finish accepted work, deregister, then stop the server."""
        log.info("draining: %d in flight, %d queued", self.worker.load().in_flight, self.worker.load().queued)
        self.worker.draining = True
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._channel is not None and self._registered.is_set() and not self.fatal:
            try:  # tell the registry at once, so no new work is routed here while we finish
                await self._stub.Heartbeat(
                    registry_pb2.HeartbeatRequest(node_id=self.node_id, load=load_to_pb(self.worker.load()), draining=True),
                    metadata=auth_metadata(self.token), timeout=2,
                )
            except grpc.aio.AioRpcError:
                pass
        try:
            await asyncio.wait_for(self.worker.wait_idle(), self.config.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain timed out after %.0fs with work still in flight", self.config.drain_timeout_s)
        if self._heartbeats:
            self._heartbeats.cancel()
        if self._channel is not None:
            if self._registered.is_set() and not self.fatal:
                try:
                    await self._stub.Deregister(
                        registry_pb2.DeregisterRequest(node_id=self.node_id), metadata=auth_metadata(self.token), timeout=2
                    )
                    log.info("deregistered from %s", self.config.registry)
                except grpc.aio.AioRpcError as e:
                    log.warning("deregistration failed: %s", e.details())
            await self._channel.close()
        await self.server.stop(grace=1.0)
        self.worker.close()


async def serve(config: EdgeNodeConfig) -> int:
    """Run an edge node until SIGTERM/SIGINT, then drain. Returns the process exit code."""
    node = EdgeNode(config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.registry:
        waiter = asyncio.ensure_future(node.wait_registered())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done() and waiter.exception():
            print(f"error: {waiter.exception()}", flush=True)
            await node.drain()
            return 1
        stopper.cancel()
    print(
        f"hera edge node {node.node_id} serving {node.model_id} on {config.host}:{node.port}"
        + (" over mTLS" if config.tls_client_auth else " over TLS" if config.tls.serves_tls else "")
        + (f" (registered with {config.registry})" if config.registry else ""),
        flush=True,
    )
    await stop.wait()
    await node.drain()
    print(f"hera edge node {node.node_id} drained and stopped", flush=True)
    return 0
