"""Helpers for tests that start real registries and edge nodes as local processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc

from hera_ray.launcher import LocalProcess, start_edge, start_registry, write_token_file
from hera_ray.wire import auth_metadata, edge_pb2, edge_pb2_grpc, registry_pb2, registry_pb2_grpc

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class Procs:
    """Starts processes into one folder and stops whatever is still running at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[LocalProcess] = []
        self.token_file = write_token_file(workdir / "token")
        self.token = self.token_file.read_text().split()[-1]

    def registry(self, **kw) -> LocalProcess:
        proc = start_registry(self.workdir, self.token_file, **kw)
        self.started.append(proc)
        return proc

    def edge(self, name: str, registry: LocalProcess | None = None, **kw) -> LocalProcess:
        proc = start_edge(self.workdir, name, registry.address if registry else None,
                          self.token_file if registry else None, **kw)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)


def run(coro):
    return asyncio.run(coro)


async def generate(address: str, *, stream: bool = False, timeout: float = 120, **fields):
    """Call EdgeWorker.Generate (or GenerateStream, returning (deltas, final))."""
    messages = fields.pop("messages", None)
    request = edge_pb2.GenerateRequest(**fields)
    for role, content in messages or ():
        request.messages.add(role=role, content=content)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = edge_pb2_grpc.EdgeWorkerStub(ch)
        if not stream:
            return await stub.Generate(request, timeout=timeout)
        deltas, final = [], None
        async for chunk in stub.GenerateStream(request, timeout=timeout):
            if chunk.HasField("final"):
                final = chunk.final
            else:
                deltas.append(chunk.delta)
        return deltas, final


async def list_nodes(address: str, token: str | None):
    async with grpc.aio.insecure_channel(address) as ch:
        stub = registry_pb2_grpc.EdgeRegistryStub(ch)
        reply = await stub.ListNodes(registry_pb2.ListNodesRequest(), metadata=auth_metadata(token), timeout=5)
        return {n.spec.node_id: n for n in reply.nodes}


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    """Poll an async predicate until it returns a truthy value; return it (or the last falsy one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value or loop.time() > deadline:
            return value
        await asyncio.sleep(interval)
