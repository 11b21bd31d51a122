"""Paired bootstrap intervals on hand-made benchmark records whose answer is known."""

from __future__ import annotations

import math

import pytest

from hera_ray.eval.stats import area_under_pgr, paired_bootstrap, pgr_at_cost


def anchors(n: int, slm_right: int, llm_right: int):
    return ({"all-slm": [1] * slm_right + [0] * (n - slm_right), "all-llm": [1] * llm_right + [0] * (n - llm_right)},
            {"all-slm": [0.0] * n, "all-llm": [1.0] * n})


def test_a_policy_that_is_the_llm_on_every_request_has_pgr_and_cost_exactly_one():
    correct, cost = anchors(50, 10, 30)
    correct["copy"], cost["copy"] = list(correct["all-llm"]), list(cost["all-llm"])
    ci = paired_bootstrap(correct, cost)
    assert ci["policies"]["copy"]["pgr"] == [1.0, 1.0] and ci["policies"]["copy"]["cost"] == [1.0, 1.0]
    assert ci["policies"]["all-slm"]["pgr"] == [0.0, 0.0] and ci["policies"]["all-slm"]["cost"] == [0.0, 0.0]


def test_accuracy_interval_matches_the_normal_approximation():
    n = 400
    correct = {"p": [1, 0] * (n // 2)}
    ci = paired_bootstrap(correct, {"p": [0.0] * n}, n_boot=4000)
    half = 1.96 * math.sqrt(0.25 / n)  # 0.049
    lo, hi = ci["policies"]["p"]["accuracy"]
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)
    assert ci["policies"]["p"]["pgr"] is None  # no anchors: no PGR, no relative cost


def test_paired_difference_of_identical_policies_is_zero_and_of_a_better_one_excludes_zero():
    correct, cost = anchors(100, 20, 60)
    correct["a"] = [1] * 50 + [0] * 50
    correct["same"] = list(correct["a"])
    correct["worse"] = [1] * 30 + [0] * 70  # right only where "a" is right: a paired win on 20 requests
    for p in ("a", "same", "worse"):
        cost[p] = [0.5] * 100
    ci = paired_bootstrap(correct, cost, best="a")
    assert ci["best"] == "a"
    assert ci["differences"]["same"] == {"accuracy": [0.0, 0.0], "pgr": [0.0, 0.0], "cost": [0.0, 0.0]}
    lo, hi = ci["differences"]["worse"]["accuracy"]
    assert 0.1 < lo < 0.2 < hi < 0.3  # 0.20, and paired: its interval is about ±0.08, not the unpaired ±0.13
    assert ci["policies"]["a"]["cost"] == [0.5, 0.5]


def test_the_best_defaults_to_the_most_accurate_non_anchor_policy_and_bad_input_is_refused():
    correct, cost = anchors(10, 2, 8)
    correct.update({"x": [1] * 6 + [0] * 4, "y": [1] * 3 + [0] * 7})
    cost.update({"x": [0.1] * 10, "y": [0.1] * 10})
    ci = paired_bootstrap(correct, cost, n_boot=200)
    assert ci["best"] == "x" and set(ci["differences"]) == {"y", "all-slm", "all-llm"}  # the anchors too
    with pytest.raises(ValueError, match="same requests"):
        paired_bootstrap({"a": [1, 0], "b": [1]}, {"a": [0, 0], "b": [0]})


def test_draws_where_the_anchors_tie_leave_pgr_out_and_are_counted():
    correct = {"all-slm": [1, 0], "all-llm": [0, 1], "p": [1, 1]}  # many draws tie the anchors
    ci = paired_bootstrap(correct, {k: [1.0, 1.0] for k in correct}, n_boot=500)
    assert 0 < ci["pgr_undefined"] < 500


def test_the_bench_summary_and_json_carry_each_policy_s_intervals_and_the_differences():
    from hera_ray.eval.bench import result_json, summarise

    def rec(correct, cost):
        return {"correct": correct, "f1": 0.0, "subtasks": 4, "edge_subtasks": 2, "cost": cost, "latency_s": 10.0,
                "decision_s": 0.1, "model_s": 9.0, "stages": {}}

    records = {}
    for i in range(40):
        records[("all-slm", str(i))] = rec(i < 8, 0.0)
        records[("all-llm", str(i))] = rec(i < 24, 1.0)
        records[("hera-verify", str(i))] = rec(i < 22, 0.3)
        records[("random", str(i))] = rec(i < 14, 0.5)
    for i in range(40):  # random's second sweep point: right on 10
        records[("random@0.25", str(i))] = rec(i < 10, 0.8)
    policies = ["all-slm", "all-llm", "hera-verify", "random", "random@0.25"]
    summary = summarise(records, policies, {"hera-verify": (), "random": (0.25,)}, best="hera-verify")
    out = result_json("gsm8k", "dev", "hera bench", summary, {})
    assert out["best"] == "hera-verify" and set(out["differences"]) == {"random", "random@0.25", "all-slm", "all-llm"}
    # APGR, the area under random's curve (0, 0) (0.5, 6/16) (0.8, 2/16) (1, 1):
    # 0.5 * 3/16 + 0.3 * 4/16 + 0.2 * 9/16 = 0.28125, with its interval on both points
    assert out["policies"]["random"]["apgr"] == pytest.approx(0.28125) == out["policies"]["random@0.25"]["apgr"]
    lo, hi = out["policies"]["random"]["apgr_ci"]
    assert lo < 0.28125 < hi and out["policies"]["random@0.25"]["apgr_ci"] == [lo, hi]
    assert out["policies"]["all-llm"]["apgr_ci"] is None
    # hera-verify's (0, 0) (0.3, 14/16) (1, 1): 0.3 * 7/16 + 0.7 * 15/16 = 0.7875, above random's on every draw
    assert out["policies"]["hera-verify"]["apgr"] == pytest.approx(0.7875)
    assert out["apgr_differences"]["random"][0] > 0
    ci = out["policies"]["hera-verify"]["ci"]
    assert ci["accuracy"][0] < 22 / 40 < ci["accuracy"][1] and ci["cost"] == [0.3, 0.3]
    assert ci["pgr"][0] < (22 - 8) / (24 - 8) < ci["pgr"][1]
    assert out["differences"]["random"]["accuracy"][0] > 0  # right on a superset of random's requests


def test_pgr_has_no_interval_when_the_anchors_gap_is_not_clearly_positive():
    correct = {"all-slm": [1, 0] * 20, "all-llm": [0, 1] * 20, "p": [1] * 40}  # the anchors tie: the gap straddles 0
    ci = paired_bootstrap(correct, {k: [1.0] * 40 for k in correct}, n_boot=500)
    assert ci["policies"]["p"]["pgr"] is None and ci["policies"]["p"]["accuracy"] == [1.0, 1.0]
    assert ci["pgr_undefined"] > 0.025 * 500


def test_apgr_is_the_area_under_the_pgr_cost_curve_closed_by_the_anchors():
    # a router no better than mixing the anchors at random (PGR equal to cost) scores 0.5
    assert area_under_pgr([(0.25, 0.25), (0.5, 0.5), (0.75, 0.75)]) == pytest.approx(0.5)
    assert area_under_pgr([(0.0, 0.0)]) == pytest.approx(0.5)
    # the whole gap at no cost scores 1; nothing recovered until nearly all-llm's cost, nearly 0
    assert area_under_pgr([(0.0, 1.0)]) == pytest.approx(1.0)
    assert area_under_pgr([(0.99, 0.0)]) == pytest.approx(0.01 * 0.5)
    # (0, 0) (0.25, 0.5) (0.5, 1) (1, 1): 0.0625 + 0.1875 + 0.5, in any order of the points
    assert area_under_pgr([(0.5, 1.0), (0.25, 0.5)]) == pytest.approx(0.75)
    # more sweep points on the same line leave the area as it is (a mean of points' PGR would move)
    assert area_under_pgr([(0.25, 0.5), (0.375, 0.75), (0.5, 1.0)]) == pytest.approx(0.75)
    # a point dearer than all-llm is left out: all-llm beats it
    assert area_under_pgr([(0.5, 0.5), (1.2, -1.0)]) == pytest.approx(0.5)
    # at equal cost the better point counts, so a point at all-llm's cost changes nothing
    assert area_under_pgr([(0.5, 0.4), (0.5, 0.8)]) == pytest.approx(0.25 * 0.8 + 0.5 * 0.9)
    assert area_under_pgr([(1.0, 0.5)]) == pytest.approx(0.5) == area_under_pgr([(1.01, 0.5), (0.5, 0.5)])
    # no point within all-llm's cost: no curve of the router's own, no figure
    assert math.isnan(area_under_pgr([(1.2, 0.9)]))
    # a point below all-slm's accuracy pulls the area under 0 there
    assert area_under_pgr([(0.5, -0.5)]) == pytest.approx(0.5 * -0.25 + 0.5 * 0.25)
    assert math.isnan(area_under_pgr([(0.5, float("nan"))]))


def test_a_router_s_pgr_at_a_cost_is_read_off_the_same_curve():
    # (0, 0) (0.25, 0.5) (0.5, 1) (1, 1): between points, the straight line; at a point, the point
    pts = [(0.5, 1.0), (0.25, 0.5)]
    assert pgr_at_cost(pts, 0.25) == pytest.approx(0.5)
    assert pgr_at_cost(pts, 0.375) == pytest.approx(0.75)
    assert pgr_at_cost(pts, 0.1) == pytest.approx(0.2)  # on the closing line from all-slm
    assert pgr_at_cost(pts, 0.75) == pytest.approx(1.0)
    # past its last point, the closing line to all-llm: (0.4, 0.2) -> (1, 1)
    assert pgr_at_cost([(0.4, 0.2)], 0.7) == pytest.approx(0.6)
    # the better of two points at one cost; a point dearer than all-llm is off the curve
    assert pgr_at_cost([(0.5, 0.4), (0.5, 0.8), (1.2, 2.0)], 0.5) == pytest.approx(0.8)
    assert math.isnan(pgr_at_cost(pts, 1.5)) and math.isnan(pgr_at_cost([(1.2, 0.9)], 0.5))


def test_a_router_s_apgr_interval_is_paired_and_holds_the_area_of_its_points():
    correct, cost = anchors(100, 20, 60)
    # PGR of each point: (acc - 0.2) / 0.4. "v": 0.6 at cost 0.5 and 0.4 at cost 0.25 -> PGR 1.0 and 0.5:
    # (0, 0) (0.25, 0.5) (0.5, 1) (1, 1) = 0.75 exactly on every draw where each point is right on a
    # superset of all-slm's requests and a subset of all-llm's.
    correct["v"] = [1] * 60 + [0] * 40
    correct["v@0.8"] = [1] * 40 + [0] * 60
    correct["r"] = [1] * 30 + [0] * 70          # PGR 0.25 at cost 0.5
    correct["r@0.5"] = [1] * 20 + [0] * 80      # PGR 0.00 at cost 0.25
    cost["v"], cost["r"] = [0.5] * 100, [0.5] * 100
    cost["v@0.8"], cost["r@0.5"] = [0.25] * 100, [0.25] * 100
    ci = paired_bootstrap(correct, cost, best="v", routers={"v": ["v", "v@0.8"], "r": ["r", "r@0.5"]})
    lo, hi = ci["apgr"]["v"]
    assert lo < 0.75 < hi and hi - lo < 0.3
    assert set(ci["apgr_differences"]) == {"r"}
    lo, hi = ci["apgr_differences"]["r"]
    # r: (0, 0) (0.25, 0) (0.5, 0.25) (1, 1) = 0.03125 + 0.3125 = 0.34375; v - r = 0.40625, and paired ("r" is
    # right only where "v" is) the interval is clear of 0
    assert 0.1 < lo < 0.40625 < hi < 0.7
    # a router whose points all equal the best's differs by exactly 0
    correct["w"], cost["w"] = list(correct["v"]), list(cost["v"])
    ci = paired_bootstrap(correct, cost, best="v@0.8", routers={"v": ["v"], "w": ["w"]})
    assert ci["apgr_differences"] == {"w": [0.0, 0.0]}
