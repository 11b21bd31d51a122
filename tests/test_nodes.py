"""The node table, as plain code with a hand-driven clock."""

from __future__ import annotations

import pytest

from hera_ray.errors import InvalidRequest, NodeIdConflict, PermissionDenied, UnknownNode
from hera_ray.pricing import PriceSheet
from hera_ray.scheduler.nodes import NodeLoad, NodeSpec, NodeState, NodeTable


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def spec(node_id="n1", **kw):
    return NodeSpec(**{"node_id": node_id, "address": "127.0.0.1:50061", "model": "smollm2-135m", "n_ctx": 2048,
                       "slots": 2, **kw})


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def table(clock):
    return NodeTable(heartbeat_interval_s=1.0, missed_heartbeats=3, clock=clock)


def test_register_then_heartbeat_updates_load(table):
    table.register(spec(), "tok")
    table.heartbeat("n1", NodeLoad(in_flight=1, queued=1, tokens_per_s=40.0), "tok")
    (record,) = table.nodes()
    assert record.state is NodeState.UP
    assert record.load.tokens_per_s == 40.0
    assert record.utilisation == 1.0  # 2 busy of 2 slots


def test_missing_three_heartbeats_marks_down_and_a_heartbeat_revives(table, clock):
    table.register(spec("a"), "tok")
    table.register(spec("b"), "tok")
    clock.now += 2.5
    table.heartbeat("b", NodeLoad(), "tok")
    assert table.expire() == []
    clock.now += 0.6  # a: 3.1 s of silence > 3 x 1 s
    assert table.expire() == ["a"]
    assert table.expire() == []  # reported once
    assert [r.spec.node_id for r in table.live()] == ["b"]
    table.heartbeat("a", NodeLoad(), "tok")  # e.g. after SIGCONT
    assert table.get("a").state is NodeState.UP


def test_node_id_is_bound_to_its_token(table):
    table.register(spec(), "tok-1")
    with pytest.raises(NodeIdConflict, match="already registered with another token"):
        table.register(spec(address="10.0.0.9:1"), "tok-2")
    with pytest.raises(PermissionDenied):
        table.heartbeat("n1", NodeLoad(), "tok-2")
    with pytest.raises(PermissionDenied):
        table.deregister("n1", "tok-2")
    table.register(spec(address="127.0.0.1:7"), "tok-1")  # the owner may re-register (a restart)
    assert table.get("n1").spec.address == "127.0.0.1:7"


def test_draining_nodes_are_not_live(table):
    table.register(spec("a"), "t")
    table.heartbeat("a", NodeLoad(), "t", draining=True)
    assert table.get("a").state is NodeState.DRAINING
    assert table.live() == []


def test_live_filters_by_model(table):
    table.register(spec("a"), "t")
    table.register(spec("b", model="qwen2.5-coder-1.5b"), "t")
    assert [r.spec.node_id for r in table.live("qwen2.5-coder-1.5b")] == ["b"]


def test_unknown_node_heartbeat_and_deregister(table):
    with pytest.raises(UnknownNode):
        table.heartbeat("ghost", NodeLoad(), "t")
    table.register(spec(), "t")
    table.deregister("n1", "t")
    assert len(table) == 0


@pytest.mark.parametrize(
    "bad, words",
    [
        (dict(node_id=""), "node_id"),
        (dict(address="no-port"), "host:port"),
        (dict(address="h:99999"), "host:port"),
        (dict(model=""), "model"),
        (dict(slots=0), "slots"),
        # model_construct skips the sheet's own checks; the table checks it again
        (dict(prices=PriceSheet.model_construct(input_per_mtok=-1.0, cached_input_per_mtok=0.0, output_per_mtok=0.0)),
         "input_per_mtok"),
        (dict(prices=PriceSheet.model_construct(input_per_mtok=0.1, cached_input_per_mtok=0.2, output_per_mtok=0.0)),
         "may not exceed"),
        (dict(prices={"input_per_mtok": 1.0}), "prices must be a PriceSheet"),
    ],
)
def test_invalid_specs_are_refused(table, bad, words):
    with pytest.raises(InvalidRequest, match=words):
        table.register(spec(**bad), "t")


def test_live_index_matches_the_table_after_random_changes(table, clock):
    """The O(1) live index used for sampling agrees with a full scan after any mix of changes."""
    import random

    rng = random.Random(3)
    tokens = {}
    for step in range(2000):
        node_id = f"n{rng.randrange(30)}"
        op = rng.random()
        if op < 0.3:
            tokens.setdefault(node_id, "t")
            table.register(spec(node_id, model=rng.choice(["a", "b"])), tokens[node_id])
        elif op < 0.6 and node_id in tokens:
            table.heartbeat(node_id, NodeLoad(), "t", draining=rng.random() < 0.3)
        elif op < 0.7 and node_id in tokens:
            table.deregister(node_id, "t")
            del tokens[node_id]
        elif op < 0.8:
            clock.now += rng.random() * 2
            table.expire()
        for model in ("a", "b"):
            live = {r.spec.node_id for r in table.live(model)}
            assert table.live_count(model) == len(live)
            sampled = table.sample_live(model, 2, rng)
            assert {r.spec.node_id for r in sampled} <= live and len(sampled) == min(2, len(live))
