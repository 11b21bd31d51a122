"""The routing decision as plain code: policies, budget fallback, node choice and affinity."""

from __future__ import annotations

import asyncio

import pytest

from hera_ray.errors import BudgetExceeded, InvalidRequest, UnknownPolicy
from hera_ray.policy import Placement, build_policies
from hera_ray.policy.baselines import RandomPolicy
from hera_ray.policy.base import SubtaskContext
from hera_ray.scheduler.nodes import NodeLoad, NodeSpec, NodeTable
from hera_ray.pricing import DEFAULT_CLOUD_PRICES, FREE, PriceSheet
from hera_ray.scheduler.router import RouteRequest, Router, SubtaskReport

EDGE = "smollm2-135m"
EDGE_PRICES = PriceSheet.flat(0.01)  # the old flat prices: 0.01 and 2.0 per 1,000 tokens of any kind
CLOUD_PRICES = PriceSheet.flat(2.0)


def make_router(nodes=(("a", 1), ("b", 1)), cap=None, model=EDGE):
    table = NodeTable()
    for node_id, slots in nodes:
        table.register(NodeSpec(node_id, f"127.0.0.1:{5000 + len(table)}", model, 2048, slots, 0, EDGE_PRICES), "t")
    return Router(table, build_policies(0.5, seed=1), EDGE, "qwen", CLOUD_PRICES, cap), table


def route(router, policy="all-slm", request_id="r1", index=0, cap=None, exclude=()):
    return asyncio.run(router.route(RouteRequest(request_id, policy, index, exclude_nodes=exclude), cap))


def test_all_slm_and_all_llm_place_everything_on_one_side():
    router, _ = make_router()
    assert route(router, "all-slm").placement is Placement.EDGE
    r = route(router, "all-llm")
    assert r.placement is Placement.CLOUD and r.node_id == "cloud" and r.prices == CLOUD_PRICES.model_dump()
    assert route(router, "all-slm").prices == EDGE_PRICES.model_dump()


def test_unknown_policy_names_the_choices():
    router, _ = make_router()
    with pytest.raises(UnknownPolicy, match="all-llm, all-slm, cascade, random"):
        route(router, "gpt-9")


def test_a_policy_with_a_knob_is_tuned_by_name_and_bad_values_are_refused():
    router, _ = make_router()
    assert route(router, "random@0").placement is Placement.CLOUD
    assert route(router, "random@1").placement is Placement.EDGE
    assert router.policy("random@0.25").slm_share == 0.25 and router.policy("random@0.25") is router.policy("random@0.25")
    assert router.policy("random").slm_share == 0.5  # the configured policy is untouched
    with pytest.raises(UnknownPolicy, match="slm_share"):
        route(router, "random@1.5")
    with pytest.raises(UnknownPolicy, match="slm_share"):
        route(router, "random@lots")
    with pytest.raises(UnknownPolicy, match="has no knob"):
        route(router, "all-slm@0.3")
    with pytest.raises(UnknownPolicy, match="unknown policy 'gpt@0.3'"):
        route(router, "gpt@0.3")


def test_least_loaded_node_is_picked_and_a_request_sticks_to_its_node():
    router, table = make_router()
    first = route(router, request_id="r1")
    other = route(router, request_id="r2")
    assert {first.node_id, other.node_id} == {"a", "b"}  # r2 avoids the node r1 occupies
    router.report(SubtaskReport("r1", Placement.EDGE, first.node_id, 10, 0, 5, EDGE_PRICES))
    router.report(SubtaskReport("r2", Placement.EDGE, other.node_id, 10, 0, 5, EDGE_PRICES))
    table.heartbeat(first.node_id, NodeLoad(in_flight=1), "t")  # busy with someone else's work
    assert route(router, request_id="r1", index=1).node_id == first.node_id  # affinity wins while up
    assert route(router, request_id="r3").node_id == other.node_id  # a new request goes to the idle one


def test_a_failed_node_is_excluded_and_affinity_dropped():
    router, _ = make_router()
    first = route(router, request_id="r1")
    router.report(SubtaskReport("r1", Placement.EDGE, first.node_id, prices=EDGE_PRICES, ok=False))
    again = route(router, request_id="r1", exclude=(first.node_id,))
    assert again.node_id != first.node_id


def test_no_edge_node_falls_back_to_the_cloud_visibly():
    router, _ = make_router(nodes=())
    r = route(router, "all-slm")
    assert r.placement is Placement.CLOUD and r.fallback == "no-edge"


def test_nodes_of_another_model_are_not_used():
    router, _ = make_router(model="gemma-270m")
    assert route(router, "all-slm").fallback == "no-edge"


def test_budget_cap_moves_cloud_subtasks_to_the_edge():
    router, _ = make_router(cap=0.001)
    r = route(router, "all-llm")
    assert r.placement is Placement.CLOUD
    cost = router.report(SubtaskReport("r1", Placement.CLOUD, "cloud", 400, 0, 100, CLOUD_PRICES))
    assert cost == pytest.approx(1.0)
    r = route(router, "all-llm", index=1)
    assert r.placement is Placement.EDGE and r.fallback == "budget"


def test_budget_spent_with_no_edge_node_stops_the_request():
    router, _ = make_router(nodes=(), cap=0.0)
    with pytest.raises(BudgetExceeded, match="no edge node"):
        route(router, "all-llm")


def test_per_request_cap_overrides_the_default():
    router, _ = make_router(cap=None)
    assert route(router, "all-llm", cap=0.0).fallback == "budget"


def test_ledger_splits_edge_and_cloud():
    router, _ = make_router()
    router.report(SubtaskReport("r1", Placement.EDGE, "a", 100, 0, 100, EDGE_PRICES))
    router.report(SubtaskReport("r1", Placement.CLOUD, "cloud", 500, 0, 500, CLOUD_PRICES))
    usage = router.finish("r1")
    assert (usage.edge_tokens, usage.cloud_tokens) == (200, 1000)
    assert usage.cloud_cost == pytest.approx(2.0) and usage.edge_cost == pytest.approx(0.002)
    assert usage.slm_share == 0.5
    assert router.ledger.total.subtasks == 2


def cloud_router(edge_prices=FREE):
    table = NodeTable()
    table.register(NodeSpec("a", "127.0.0.1:1", EDGE, 2048, 1, prices=edge_prices), "t")
    return Router(table, build_policies(), EDGE, "gpt-4o-mini", DEFAULT_CLOUD_PRICES)


def test_a_report_with_cached_tokens_costs_by_the_three_prices_by_side_and_node():
    edge_prices = PriceSheet(input_per_mtok=0.02, cached_input_per_mtok=0.01, output_per_mtok=0.04)
    router = cloud_router(edge_prices)
    cloud = route(router, "all-llm")
    edge = route(router, "all-slm")
    # What the agent sends back: the route's prices, as a dict, and the API's token counts.
    cloud_cost = router.report(SubtaskReport.from_dict({
        "request_id": "r1", "placement": "cloud", "node_id": cloud.node_id, "prices": cloud.prices, "ok": True,
        "prompt_tokens": 10_000, "cached_prompt_tokens": 9_000, "completion_tokens": 500}))
    assert cloud_cost == pytest.approx(0.00015 + 0.000675 + 0.0003)  # gpt-4o-mini: 0.15, 0.075, 0.60 per M
    edge_cost = router.report(SubtaskReport.from_dict({
        "request_id": "r1", "placement": "edge", "node_id": edge.node_id, "prices": edge.prices, "ok": True,
        "prompt_tokens": 2_000_000, "cached_prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}))
    assert edge_cost == pytest.approx(0.02 + 0.01 + 0.04)

    usage = router.finish("r1").to_dict()
    assert (usage["cloud_uncached_prompt_tokens"], usage["cloud_cached_prompt_tokens"], usage["cloud_completion_tokens"]) == (1_000, 9_000, 500)
    assert (usage["edge_uncached_prompt_tokens"], usage["edge_cached_prompt_tokens"], usage["edge_completion_tokens"]) == (1_000_000,) * 3
    assert usage["cloud_tokens"] == 10_500 and usage["edge_tokens"] == 3_000_000
    assert usage["cloud_cost"] == pytest.approx(0.001125) and usage["edge_cost"] == pytest.approx(0.07)
    assert usage["cost"] == pytest.approx(0.071125)
    by_node = router.ledger.by_node
    assert by_node["cloud"].cloud_cost == pytest.approx(0.001125) and by_node["cloud"].edge_subtasks == 0
    assert by_node["a"].edge_cost == pytest.approx(0.07) and by_node["a"].edge_cached_prompt_tokens == 1_000_000


def test_a_report_without_cached_tokens_or_prices_is_uncached_and_free():
    router = cloud_router()
    for prices in ({}, {"prices": {}}):
        cost = router.report(SubtaskReport.from_dict({"request_id": "r1", "placement": "edge", "node_id": "a",
                                                      "prompt_tokens": 30, "completion_tokens": 5, **prices}))
        assert cost == 0.0
    usage = router.finish("r1")
    assert (usage.edge_uncached_prompt_tokens, usage.edge_cached_prompt_tokens, usage.edge_completion_tokens) == (60, 0, 10)


@pytest.mark.parametrize("bad, words", [
    ({"prompt_tokens": 10, "cached_prompt_tokens": 11}, r"cached prompt tokens \(11\) exceed the prompt's \(10\)"),
    ({"completion_tokens": -3}, "completion tokens must be an integer >= 0"),
    ({"prices": {"input_per_mtok": -1, "cached_input_per_mtok": 0, "output_per_mtok": 0}}, "invalid prices: input_per_mtok"),
    ({"prices": {"input_per_mtok": 1}}, "invalid prices: cached_input_per_mtok"),
    ({"placement": "moon"}, "malformed subtask report"),
])
def test_a_malformed_report_is_refused_and_charges_nothing(bad, words):
    router = cloud_router()
    report = {"request_id": "r1", "placement": "cloud", "node_id": "cloud", "prices": DEFAULT_CLOUD_PRICES.model_dump(),
              "prompt_tokens": 10, "completion_tokens": 1, **bad}
    with pytest.raises(InvalidRequest, match=words):
        router.report(SubtaskReport.from_dict(report))
    assert router.ledger.total.subtasks == 0


def test_the_budget_cap_is_in_usd_at_the_cloud_sheet():
    router = cloud_router()
    assert route(router, "all-llm", cap=0.001).placement is Placement.CLOUD
    router.report(SubtaskReport("r1", Placement.CLOUD, "cloud", 10_000, 9_000, 500, DEFAULT_CLOUD_PRICES))  # $0.001125
    r = route(router, "all-llm", index=1, cap=0.001)
    assert r.placement is Placement.EDGE and r.fallback == "budget"


def test_random_policy_is_seeded_and_near_its_share():
    policy = RandomPolicy(slm_share=0.3, seed=7)
    decisions = [asyncio.run(policy.decide(SubtaskContext(f"req-{i}", "", i % 5))) for i in range(2000)]
    share = sum(d.placement is Placement.EDGE for d in decisions) / len(decisions)
    assert 0.26 < share < 0.34
    again = [asyncio.run(policy.decide(SubtaskContext(f"req-{i}", "", i % 5))) for i in range(50)]
    assert [d.placement for d in again] == [d.placement for d in decisions[:50]]


def test_power_of_two_choices_spreads_load_over_many_nodes():
    router, _ = make_router(nodes=[(f"n{i}", 1) for i in range(200)])
    for i in range(400):  # two requests per node on average, none reported back yet
        route(router, request_id=f"r{i}")
    busiest = max(router.outstanding.values())
    assert busiest <= 5  # one random choice would put ~7-8 on the busiest node


def test_a_policy_can_ask_for_a_particular_edge_model():
    from hera_ray.policy.base import Decision, Policy

    class WantsGemma(Policy):
        name = "wants-gemma"

        async def decide(self, ctx):
            return Decision(Placement.EDGE, "test", edge_model="gemma-270m")

    table = NodeTable()
    table.register(NodeSpec("smol", "127.0.0.1:1", EDGE, 2048, 4), "t")
    table.register(NodeSpec("gemma", "127.0.0.1:2", "gemma-270m", 2048, 1), "t")
    router = Router(table, {**build_policies(), "wants-gemma": WantsGemma()}, EDGE, "qwen", CLOUD_PRICES)
    for i in range(5):
        r = route(router, "wants-gemma", request_id=f"r{i}")
        assert (r.node_id, r.model) == ("gemma", "gemma-270m")  # never the idle node of the other model
    assert route(router, "all-slm").node_id == "smol"
