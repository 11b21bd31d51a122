#!/usr/bin/env python3
"""Print the README's markdown for `hera bench` result files: per data set, every policy with its
paired-bootstrap 95% intervals, each router's APGR with its interval, the policy under study minus
each router, and the issue's targets (PGR >= 0.9 with SLM share >= 0.5 and cost <= 0.5 of all-llm).

    python scripts/results_markdown.py bench/results/test15/*.json
    python scripts/results_markdown.py --summary bench/results/test15/*.json   # across data sets

The summary's last table reads every router's PGR off its curve at the cost of the policy under
study: who recovers more of the gap for the same money.
"""

from __future__ import annotations

import json
from pathlib import Path

TARGET = {"pgr": 0.9, "slm_share": 0.5, "cost": 0.5}


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def with_ci(v, ci, spec: str) -> str:
    if v is None:
        return "—"
    if not ci:
        return format(v, spec)
    if spec.endswith("%"):
        return f"{v:{spec}} [{ci[0] * 100:.0f}–{ci[1] * 100:.0f}%]"
    return f"{v:{spec}} [{ci[0]:{spec}}–{ci[1]:{spec}}]"


def meets(m: dict) -> bool:
    return (m.get("pgr") is not None and m["pgr"] >= TARGET["pgr"] and m["slm_share"] >= TARGET["slm_share"]
            and m.get("cost") is not None and m["cost"] <= TARGET["cost"])


def markdown(result: dict) -> str:
    wall = result.get("runs_wall_s")
    hits = result["settings"].get("generation_cache")
    lines = [f"**{result['dataset']}/{result['split']}**: {result['n']} requests finished by every policy "
             f"(of {result.get('requested', result['n'])} asked), commit {result['commit'][:7]}"
             + (f", {wall / 3600:.1f} h of runs" if wall else "")
             + (", generation cache on" if hits else ", no generation cache") + ".", "",
             f"`{result['command']}`", "",
             "| policy | accuracy | SLM share | cost vs all-llm | PGR | APGR (router) | cache hits | meets target |",
             "|---|---|---|---|---|---|---|---|"]
    best = result.get("best")
    # PGR is measured against the anchors' gap; when the bootstrap found it not clearly positive, no
    # policy has a PGR interval and no PGR target can be judged on this data set.
    gap_clear = any((m.get("ci") or {}).get("pgr") for m in result["policies"].values())
    for name, m in result["policies"].items():
        ci = m.get("ci") or {}
        label = f"**{name}**" if name == best else name
        lines.append(f"| {label} | {with_ci(m['accuracy'], ci.get('accuracy'), '.0%')} | {fmt(m['slm_share'], '.0%')} | "
                     f"{with_ci(m['cost'], ci.get('cost'), '.2f')} | {with_ci(m['pgr'], ci.get('pgr'), '.2f')} | "
                     f"{with_ci(m.get('apgr'), m.get('apgr_ci'), '.2f')} | {fmt(m.get('cache_hit_rate'), '.0%')} | "
                     f"{'—' if name in ('all-slm', 'all-llm') else ('yes' if meets(m) else 'no') if gap_clear else 'n/a'} |")
    if not gap_clear:
        undefined = (result.get("bootstrap") or {}).get("pgr_undefined")
        lines += ["", f"all-llm is not clearly above all-slm here ({undefined} of "
                  f"{(result.get('bootstrap') or {}).get('n_boot')} bootstrap draws have no positive gap): PGR, APGR and "
                  "the target are not judged on this data set."]
    diffs = result.get("apgr_differences") or {}
    parts = [f"{r} [{ci[0]:+.2f}, {ci[1]:+.2f}]" for r, ci in diffs.items() if ci]
    if parts and best:
        home = best.partition("@")[0]
        lines += ["", f"APGR of `{home}` minus each router's (paired 95%): " + ", ".join(parts) + "."]
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """Across data sets: each router's APGR with its interval, and the policy under study against
    the targets."""
    routers: dict[str, dict[str, str]] = {}
    for r in results:
        for name, m in r["policies"].items():
            base = name.partition("@")[0]
            if m.get("apgr") is not None:  # every point of a router carries the router's APGR
                span = m.get("apgr_span")
                reach = f" (points at cost {span[0]:.2f}–{span[1]:.2f})" if span else ""
                routers.setdefault(base, {}).setdefault(r["dataset"], with_ci(m["apgr"], m.get("apgr_ci"), ".2f") + reach)
    sets = [r["dataset"] for r in results]
    lines = ["| router (APGR: area under its PGR-vs-cost curve) | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for base, by_set in routers.items():
        lines.append(f"| {base} | " + " | ".join(by_set.get(d, "—") for d in sets) + " |")
    lines += ["", "| data set (n) | policy under study | accuracy | SLM share | cost | PGR | target |", "|---|---|---|---|---|---|---|"]
    for r in results:
        best = r.get("best")
        m = r["policies"].get(best) if best else None
        if m:
            ci = m.get("ci") or {}
            lines.append(f"| {r['dataset']} ({r['n']}) | {best} | {with_ci(m['accuracy'], ci.get('accuracy'), '.0%')} | "
                         f"{fmt(m['slm_share'], '.0%')} | {with_ci(m['cost'], ci.get('cost'), '.2f')} | "
                         f"{with_ci(m['pgr'], ci.get('pgr'), '.2f')} | "
                         f"{('met' if meets(m) else 'missed') if ci.get('pgr') else 'n/a: no clear gap'} |")
    lines += ["", "| data set | cost of the policy under study | " + " | ".join(routers) + " |",
              "|---|---|" + "---|" * len(routers)]
    for r in results:
        m = r["policies"].get(r.get("best") or "")
        if not m or m.get("cost") is None or not (m.get("ci") or {}).get("pgr"):
            continue
        at = at_cost(r, m["cost"])
        lines.append(f"| {r['dataset']} | {m['cost']:.2f} | " + " | ".join(fmt(at.get(b), ".2f") for b in routers) + " |")
    return "\n".join(lines)


def at_cost(result: dict, cost: float) -> dict[str, float]:
    """Each router's PGR at ``cost``, read off its curve (the one its APGR integrates): between its
    measured points, what mixing them per request recovers; past its last point, the closing line."""
    from hera_ray.eval.stats import pgr_at_cost

    points: dict[str, list[tuple[float, float]]] = {}
    for name, m in result["policies"].items():
        if m.get("apgr") is not None and m.get("cost") is not None and m.get("pgr") is not None:
            points.setdefault(name.partition("@")[0], []).append((m["cost"], m["pgr"]))
    return {base: pgr_at_cost(pts, cost) for base, pts in points.items()}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="hera bench JSON files (bench/results/<dir>/<dataset>.json)")
    ap.add_argument("--summary", action="store_true", help="one table across data sets: the best policy and the targets")
    args = ap.parse_args()
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        ap.error(f"no such result file: {', '.join(missing)}")
    results = [json.loads(p.read_text()) for p in args.results]
    if args.summary:
        print(summary(results))
    else:
        for result in results:
            print(markdown(result))
            print()


if __name__ == "__main__":
    main()
