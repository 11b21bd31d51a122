"""The pieces a multi-host cluster needs that a single machine never exercises: the addresses the
registry and the ingress are given out at, the scheduler actor pinned to the head, the cloud
replicas' custom resources, and gRPC keepalive (a call over a cut link fails fast instead of hanging;
a long call is not cut by the server's ping policy). tests/cluster/ runs them for real across hosts."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cloud_node.deployment import deployment_options
from hera_ray.config import CloudLLMConfig, HeraConfig
from hera_ray.scheduler import actor as actor_mod
from hera_ray.scheduler.actor import HEAD_NODE_RESOURCE, advertised_host, host_port
from hera_ray.wire import KEEPALIVE_MS, keepalive_options, server_options


def test_the_registry_is_given_out_at_a_dialable_address():
    node_ip = lambda: "198.18.77.1"  # noqa: E731
    assert advertised_host("0.0.0.0", None, node_ip) == "198.18.77.1"  # a wildcard is not dialable: the node's IP
    assert advertised_host("::", None, node_ip) == "198.18.77.1"
    assert advertised_host("127.0.0.1", None, node_ip) == "127.0.0.1"  # a concrete bind address as it is
    assert advertised_host("0.0.0.0", "head.example.org", node_ip) == "head.example.org"  # the setting wins
    assert host_port("198.18.77.1", 50051) == "198.18.77.1:50051"
    assert host_port("fd00::1", 50051) == "[fd00::1]:50051"


def test_the_advertise_host_setting_is_a_scheduler_field():
    config = HeraConfig.model_validate({"scheduler": {"registry_host": "0.0.0.0", "registry_advertise_host": "10.0.0.10"}})
    assert config.scheduler.registry_advertise_host == "10.0.0.10"


def test_the_scheduler_actor_is_pinned_to_the_head_node(monkeypatch):
    seen = {}

    class FakeActorClass:
        def options(self, **kw):
            seen.update(kw)
            return self

        def remote(self, config):
            return "handle"

    monkeypatch.setattr(actor_mod.ray, "remote", lambda cls: FakeActorClass())
    assert actor_mod.get_or_create_scheduler(HeraConfig()) == "handle"
    # A sliver of the resource only the head has: the actor, and every restart of it, runs there.
    assert seen["resources"] == {HEAD_NODE_RESOURCE: 0.001} and HEAD_NODE_RESOURCE == "node:__internal_head__"
    assert seen["num_cpus"] == 0 and seen["max_restarts"] == -1 and seen["lifetime"] == "detached"


def test_cloud_replicas_ask_for_their_custom_resources():
    assert "resources" not in deployment_options(CloudLLMConfig())["ray_actor_options"]
    options = deployment_options(CloudLLMConfig(resources={"cloud": 1}, num_cpus=0.5))
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "resources": {"cloud": 1.0}}


def test_edge_channels_use_keepalive():
    from hera_ray.serve.executor import ClusterExecutor

    options = dict(ClusterExecutor(cloud_handle=None)._options)
    assert options["grpc.keepalive_time_ms"] == KEEPALIVE_MS and options["grpc.http2.max_pings_without_data"] == 0
    assert dict(server_options(1 << 20))["grpc.http2.min_ping_interval_without_data_ms"] <= KEEPALIVE_MS


@pytest.mark.timeout(60)
def test_a_long_call_survives_the_keepalive_pings():
    """A subtask longer than several keepalive intervals: without room for the pings on the server,
    gRPC takes the third one past two strikes as abuse and drops the connection (GOAWAY
    too_many_pings, 8 s into the call with 2 s pings)."""
    call_s = KEEPALIVE_MS / 1000 * 5

    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(call_s)
        return b"done"

    async def main() -> tuple[bytes, float]:
        server = grpc.aio.server(options=server_options(1 << 20))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=keepalive_options()) as channel:
                t0 = time.monotonic()
                reply = await channel.unary_unary("/test.Slow/Call")(b"", timeout=30)
                return reply, time.monotonic() - t0
        finally:
            await server.stop(None)

    reply, took = asyncio.run(main())
    assert reply == b"done" and took >= call_s
