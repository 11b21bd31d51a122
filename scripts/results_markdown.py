#!/usr/bin/env python3
"""Print the README's markdown for `hera bench` result files: per data set, every policy with its
paired-bootstrap 95% intervals, each router's APGR with its interval, the policy under study minus
each router, and the issue's targets (PGR >= 0.9 with SLM share >= 0.5 and cost <= 0.5 of all-llm).

    python scripts/results_markdown.py bench/results/test15/*.json
"""

from __future__ import annotations

import json
import sys
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
    for name, m in result["policies"].items():
        ci = m.get("ci") or {}
        label = f"**{name}**" if name == best else name
        lines.append(f"| {label} | {with_ci(m['accuracy'], ci.get('accuracy'), '.0%')} | {fmt(m['slm_share'], '.0%')} | "
                     f"{with_ci(m['cost'], ci.get('cost'), '.2f')} | {with_ci(m['pgr'], ci.get('pgr'), '.2f')} | "
                     f"{with_ci(m.get('apgr'), m.get('apgr_ci'), '.2f')} | {fmt(m.get('cache_hit_rate'), '.0%')} | "
                     f"{'yes' if meets(m) else ''} |")
    diffs = result.get("apgr_differences") or {}
    parts = [f"{r} [{ci[0]:+.2f}, {ci[1]:+.2f}]" for r, ci in diffs.items() if ci]
    if parts and best:
        home = best.partition("@")[0]
        lines += ["", f"APGR of `{home}` minus each router's (paired 95%): " + ", ".join(parts) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(markdown(json.loads(Path(path).read_text())))
        print()
