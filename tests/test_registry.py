"""Edge nodes register with a real registry over gRPC, report load, die, drain and come back."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from edge_helpers import generate, list_nodes, run, wait_for
from hera_ray.wire import auth_metadata, edge_pb2, edge_pb2_grpc, registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(300)

UP, DRAINING, DOWN = registry_pb2.NODE_STATE_UP, registry_pb2.NODE_STATE_DRAINING, registry_pb2.NODE_STATE_DOWN


def test_two_edges_register_generate_and_show_load(procs):
    registry = procs.registry()
    a = procs.edge("edge-a", registry)
    b = procs.edge("edge-b", registry)
    nodes = run(list_nodes(registry.address, procs.token))
    assert set(nodes) == {"edge-a", "edge-b"}
    assert all(n.state == UP and n.spec.model == "smollm2-135m" for n in nodes.values())
    assert nodes["edge-a"].spec.address == a.address and nodes["edge-b"].spec.address == b.address

    for edge, n in ((a, 12), (b, 20)):
        reply = run(generate(edge.address, prompt="Once upon a time", max_tokens=n))
        assert reply.completion_tokens == n and reply.node_id == edge.node_id

    async def loads_arrived():
        nodes = await list_nodes(registry.address, procs.token)
        done = {k: n.load.tokens_generated for k, n in nodes.items()}
        return nodes if done == {"edge-a": 12, "edge-b": 20} else None

    nodes = run(wait_for(loads_arrived, timeout=60))
    assert nodes, "heartbeats did not carry the load to the registry"
    assert nodes["edge-a"].load.completed == 1 and nodes["edge-a"].load.tokens_per_s > 0
    assert all(n.state == UP for n in nodes.values())  # none has missed its 3 heartbeats (it would be down)


def test_killed_node_is_marked_down_after_its_missed_heartbeats(procs):
    """Defaults: a heartbeat every 1 s, down after 3 missed. A generous deadline (a loaded 2-core box
    must not fail this); what is asserted is the order of events: the victim's heartbeats stopped,
    then it was marked down, while the survivor stayed up."""
    registry = procs.registry()
    victim = procs.edge("edge-victim", registry)
    procs.edge("edge-survivor", registry)
    victim.popen.send_signal(signal.SIGKILL)

    async def victim_down():
        nodes = await list_nodes(registry.address, procs.token)
        return nodes["edge-victim"].state == DOWN and nodes

    nodes = run(wait_for(victim_down, timeout=60, interval=0.1))
    assert nodes, "the killed node was not marked down"
    # Marked down for its silence, not before: its last heartbeat is older than the missed ones.
    assert nodes["edge-victim"].last_heartbeat_age_s >= 2.0, nodes["edge-victim"]
    assert nodes["edge-survivor"].state == UP  # still heartbeating: not marked down with the victim


def test_sigterm_drains_in_flight_work_then_deregisters(procs):
    registry = procs.registry()
    edge = procs.edge("edge-drain", registry)

    async def scenario():
        long_job = asyncio.ensure_future(generate(
            edge.address, messages=[("user", "Write a long story about a castle.")], max_tokens=120))
        async def decoding():  # the node has taken the job
            async with grpc.aio.insecure_channel(edge.address) as ch:
                info = await edge_pb2_grpc.EdgeWorkerStub(ch).Info(edge_pb2.InfoRequest(), timeout=5)
            return info.load.in_flight > 0

        assert await wait_for(decoding, timeout=60, interval=0.02), "the long job never started"
        edge.popen.send_signal(signal.SIGTERM)

        async def draining():
            nodes = await list_nodes(registry.address, procs.token)
            return "edge-drain" in nodes and nodes["edge-drain"].state == DRAINING

        was_draining = await wait_for(draining, timeout=30, interval=0.05)
        refused = None
        try:
            await generate(edge.address, prompt="new work", max_tokens=4, timeout=5)
        except grpc.aio.AioRpcError as e:
            refused = e
        return await long_job, was_draining, refused

    reply, was_draining, refused = run(scenario())
    assert reply.completion_tokens == 120  # in-flight work finished in full
    assert was_draining
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    assert edge.popen.wait(30) == 0
    assert "edge-drain" not in run(list_nodes(registry.address, procs.token))
    assert "drained and stopped" in edge.log_path.read_text()


def test_wrong_or_missing_token_is_unauthenticated(procs):
    registry = procs.registry()

    async def call(token):
        async with grpc.aio.insecure_channel(registry.address) as ch:
            stub = registry_pb2_grpc.EdgeRegistryStub(ch)
            spec = registry_pb2.NodeSpec(node_id="intruder", address="127.0.0.1:1", model="m", n_ctx=1, slots=1)
            return await stub.Register(registry_pb2.RegisterRequest(node=spec), metadata=auth_metadata(token), timeout=5)

    for token in (None, "not-the-token"):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            run(call(token))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in exc.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        run(list_nodes(registry.address, "not-the-token"))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert registry.popen.poll() is None


def test_edge_with_wrong_token_exits_with_a_clear_error(procs):
    registry = procs.registry()
    bad = procs.workdir / "bad-token"
    bad.write_text("wrong\n")
    from hera_ray.launcher import LaunchError, start_edge

    with pytest.raises(LaunchError) as exc:
        start_edge(procs.workdir, "edge-bad", registry.address, bad)
    assert "refused this node: wrong token" in str(exc.value)


def test_duplicate_node_id_with_another_token_is_refused(procs):
    # The registry accepts two tokens, as for two edge boxes; a node id stays with its token.
    procs.token_file.write_text(procs.token_file.read_text() + "second-box-token\n")
    registry = procs.registry()
    procs.edge("edge-dup", registry)

    async def register_as(token):
        async with grpc.aio.insecure_channel(registry.address) as ch:
            spec = registry_pb2.NodeSpec(node_id="edge-dup", address="127.0.0.1:9", model="smollm2-135m", n_ctx=512, slots=1)
            return await registry_pb2_grpc.EdgeRegistryStub(ch).Register(
                registry_pb2.RegisterRequest(node=spec), metadata=auth_metadata(token), timeout=5)

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        run(register_as("second-box-token"))
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'edge-dup' is already registered with another token" in exc.value.details()
    nodes = run(list_nodes(registry.address, procs.token))
    assert nodes["edge-dup"].spec.address != "127.0.0.1:9"  # the original is untouched


def test_nodes_register_again_after_a_registry_restart(procs):
    registry = procs.registry()
    port = registry.address.rsplit(":", 1)[1]
    procs.edge("edge-back", registry)
    registry.popen.kill()
    registry.popen.wait(30)
    registry = procs.registry(port=int(port))

    async def back():
        try:
            nodes = await list_nodes(registry.address, procs.token)
        except grpc.aio.AioRpcError:
            return None
        return "edge-back" in nodes and nodes["edge-back"].state == UP

    assert run(wait_for(back, timeout=60))


def test_bad_registration_fields_are_invalid_argument(procs):
    registry = procs.registry()

    async def register(**spec):
        async with grpc.aio.insecure_channel(registry.address) as ch:
            return await registry_pb2_grpc.EdgeRegistryStub(ch).Register(
                registry_pb2.RegisterRequest(node=registry_pb2.NodeSpec(**spec)), metadata=auth_metadata(procs.token), timeout=5)

    cases = [
        (dict(node_id="", address="127.0.0.1:1", model="m", n_ctx=1, slots=1), "node_id"),
        (dict(node_id="n", address="nowhere", model="m", n_ctx=1, slots=1), "host:port"),
        (dict(node_id="n", address="127.0.0.1:1", model="", n_ctx=1, slots=1), "model"),
        (dict(node_id="n", address="127.0.0.1:1", model="m", n_ctx=1, slots=0), "slots"),
    ]
    for spec, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            run(register(**spec))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in exc.value.details()
    assert registry.popen.poll() is None


def test_oversized_registration_is_refused(procs):
    registry = procs.registry()

    async def register(model: str):
        async with grpc.aio.insecure_channel(registry.address) as ch:
            spec = registry_pb2.NodeSpec(node_id="big", address="127.0.0.1:1", model=model, n_ctx=1, slots=1)
            return await registry_pb2_grpc.EdgeRegistryStub(ch).Register(
                registry_pb2.RegisterRequest(node=spec), metadata=auth_metadata(procs.token), timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        run(register("x" * (5 * 1024 * 1024)))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in exc.value.details()
    assert registry.popen.poll() is None
    assert run(register("smollm2-135m")).heartbeat_interval_s > 0  # it still serves
    assert run(list_nodes(registry.address, procs.token))["big"].spec.model == "smollm2-135m"
