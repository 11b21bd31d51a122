"""Paired bootstrap intervals for a benchmark's policies.

Every policy runs on the same requests, so the resampling is *paired*: one bootstrap sample draws
requests with replacement, and every policy's accuracy, PGR and cost are computed on that same
draw. PGR needs the two anchors of the same draw (``all-slm`` and ``all-llm`` accuracy), and cost
is relative to ``all-llm``'s cost on the same draw. The difference between two policies is taken
per draw as well, so the interval of a difference is narrower than the two intervals suggest when
the policies succeed on the same requests.

Percentile intervals (the 2.5th and 97.5th percentiles of ``n_boot`` draws for 95%). PGR divides by
the anchors' gap, so it has no interval when the gap is not clearly positive: when more than
(1 - level) / 2 of the draws have all-llm at or below all-slm (counted in ``pgr_undefined``), the
PGR intervals are None; otherwise the draws without a positive gap are left out.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ANCHORS = ("all-slm", "all-llm")
METRICS = ("accuracy", "pgr", "cost")


def on_pgr_curve(cost: float) -> bool:
    """Whether an operating point at ``cost`` (a share of ``all-llm``'s) lies on the APGR curve: one
    that costs more than ``all-llm`` is left off, as ``all-llm`` is better and cheaper. The area,
    the bench's ``apgr_span`` and the plot's closing segments all use this one rule."""
    return cost <= 1.0


def area_under_pgr(points: Iterable[tuple[float, float]]) -> float:
    """APGR, the average performance gap recovered, in the manner of RouteLLM: the area under a
    router's PGR-vs-cost curve over cost 0 to 1, cost as a share of ``all-llm``'s (RouteLLM's x
    axis is the share of calls to the strong model; cost is what a user pays, and counts checks).

    The curve joins the router's operating points, ``(cost, pgr)``, with straight lines in order of
    cost, and is closed by the two anchors every router can fall back to: ``all-slm`` at (0, 0) and
    ``all-llm`` at (1, 1). A straight line between two operating points is what mixing them at
    random per request achieves. At equal cost the higher PGR counts (it is as cheap and better);
    a point that costs more than ``all-llm`` is left out (``all-llm`` is better and cheaper). So a
    router that only matches ``random`` (PGR equal to cost) scores 0.5, one that recovers the whole
    gap at no cost scores 1. Extra points on a straight line between others leave the area as it
    is (a mean of the points' PGR would move), but where a sweep stops short of cost 1 the closing
    line to ``all-llm`` is assumed, not measured: ``apgr_span`` in the bench JSON says how far each
    router's points reach. NaN when any point's PGR or cost is NaN (a bootstrap draw without a
    positive gap), or when no point costs at most ``all-llm``'s.
    """
    curve = pgr_curve(points)
    if curve is None:
        return float("nan")
    return float(sum((c1 - c0) * (g0 + g1) / 2 for (c0, g0), (c1, g1) in zip(curve, curve[1:])))


def pgr_curve(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]] | None:
    """The curve :func:`area_under_pgr` integrates: a router's ``(cost, pgr)`` points on it
    (:func:`on_pgr_curve`), the higher PGR at equal cost, closed by (0, 0) and (1, 1), in order of
    cost. None when any point is NaN or none costs at most ``all-llm``'s."""
    pts = [(float(c), float(g)) for c, g in points]
    if any(not (np.isfinite(c) and np.isfinite(g)) for c, g in pts):
        return None
    inside = [(max(c, 0.0), g) for c, g in pts if on_pgr_curve(c)]
    if not inside:
        return None
    best: dict[float, float] = {0.0: 0.0}
    for c, g in [*inside, (1.0, 1.0)]:
        best[c] = max(g, best.get(c, g))
    return sorted(best.items())


def pgr_at_cost(points: Iterable[tuple[float, float]], cost: float) -> float:
    """A router's PGR at ``cost`` (a share of ``all-llm``'s), read off its curve (:func:`pgr_curve`):
    between two of its points, what mixing them per request recovers in expectation. For comparing
    routers at one policy's cost. NaN where the curve is undefined or ``cost`` is outside [0, 1]."""
    curve = pgr_curve(points)
    if curve is None or not 0.0 <= cost <= 1.0:
        return float("nan")
    xs, ys = zip(*curve)
    return float(np.interp(cost, xs, ys))


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def paired_bootstrap(correct: Mapping[str, Sequence[float]], cost: Mapping[str, Sequence[float]],
                     best: str | None = None, baselines: Sequence[str] | None = None, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0,
                     routers: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Intervals of accuracy, PGR and cost (share of ``all-llm``'s) for each policy, and of the
    difference ``best`` minus each of ``baselines``.

    ``correct[p][i]`` is 1 if policy ``p`` answered request ``i`` right (0 else), ``cost[p][i]`` its
    cloud cost; every policy lists the same requests in the same order. Without the anchors, PGR and
    cost have no interval (None). ``best`` defaults to the policy, anchors aside, of the highest
    accuracy (picked on the same data, so its differences lean its way: name the policy under study
    when there is one); ``baselines`` to every other policy, the anchors included.

    ``routers`` maps a router to the policies of its sweep (its operating points, ``hera-verify`` and
    ``hera-verify@0.8``, say). A router's APGR is the area under its PGR-vs-cost curve (``apgr``),
    taken per draw like every other figure; ``apgr`` holds each router's interval and
    ``apgr_differences`` that of the router of ``best`` (``best``'s name before any ``@``) minus
    each other router's.

    Returns ``{"n_boot", "level", "policies": {p: {"accuracy": [lo, hi], "pgr": ..., "cost": ...}},
    "best": best, "differences": {baseline: {"accuracy": [lo, hi], "pgr": ..., "cost": ...}},
    "apgr": {router: [lo, hi]}, "apgr_differences": {router: [lo, hi]}}``.
    """
    policies = list(correct)
    n = {len(v) for v in correct.values()} | {len(cost[p]) for p in policies}
    if len(n) != 1:
        raise ValueError(f"every policy needs the same requests: got lengths {sorted(n)}")
    (n_items,) = n
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_items, size=(n_boot, n_items)) if n_items else np.zeros((n_boot, 0), int)
    acc = {p: np.asarray(correct[p], float)[draws].mean(axis=1) if n_items else np.full(n_boot, np.nan) for p in policies}
    spend = {p: np.asarray(cost[p], float)[draws].sum(axis=1) for p in policies}
    have_anchors = all(a in acc for a in ANCHORS)
    metrics: dict[str, dict[str, np.ndarray]] = {}
    undefined = 0
    for p in policies:
        m = {"accuracy": acc[p]}
        if have_anchors:
            gap = acc["all-llm"] - acc["all-slm"]
            with np.errstate(divide="ignore", invalid="ignore"):
                m["pgr"] = np.where(gap > 1e-12, (acc[p] - acc["all-slm"]) / gap, np.nan)
                m["cost"] = np.where(spend["all-llm"] > 0, spend[p] / spend["all-llm"], np.nan)
            undefined = int(np.sum(gap <= 1e-12))
        metrics[p] = m
    if have_anchors and undefined > (1 - level) / 2 * n_boot:  # the gap is not clearly positive: PGR is unstable
        for m in metrics.values():
            m.pop("pgr", None)
    out: dict[str, Any] = {"n_boot": n_boot, "level": level, "n": n_items, "pgr_undefined": undefined,
                           "policies": {p: {k: (_interval(m[k], level) if k in m else None) for k in METRICS}
                                        for p, m in metrics.items()}}
    candidates = [p for p in policies if p not in ANCHORS]
    if best is None and candidates:
        best = max(candidates, key=lambda p: float(np.mean(correct[p])))
    out["best"] = best
    # APGR: the area under a router's PGR-vs-cost curve, per draw (a draw without a positive gap is
    # left out).
    apgr: dict[str, np.ndarray] = {}
    for router, points in (routers or {}).items():
        pts = [p for p in points if p in metrics and "pgr" in metrics[p] and "cost" in metrics[p]]
        if pts:
            pgrs = np.stack([metrics[p]["pgr"] for p in pts], axis=1)
            costs = np.stack([metrics[p]["cost"] for p in pts], axis=1)
            apgr[router] = np.array([area_under_pgr(zip(c, g)) for c, g in zip(costs, pgrs)])
    out["apgr"] = {r: _interval(v, level) for r, v in apgr.items()}
    home = best.partition("@")[0] if best is not None else None
    out["apgr_differences"] = ({r: _interval(apgr[home] - v, level) for r, v in apgr.items() if r != home}
                               if home in apgr else {})
    out["differences"] = {}
    if best is not None:
        for b in baselines if baselines is not None else [p for p in policies if p != best]:
            if b == best or b not in metrics:
                continue
            out["differences"][b] = {k: (_interval(metrics[best][k] - metrics[b][k], level)
                                         if k in metrics[best] and k in metrics[b] else None) for k in METRICS}
    return out
