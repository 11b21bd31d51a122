#!/usr/bin/env python3
"""Print the README's markdown table for `hera bench` result files.

    python scripts/results_markdown.py bench/results/gsm8k.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` (commit {result['commit'][:10]}, {result['n']} requests)", "",
             "| policy | accuracy | SLM share | cost vs all-llm | PGR | APGR | latency p50 / p95 s | decision overhead | stages |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["policies"].items():
        stages = ", ".join(f"{k} {v}" for k, v in sorted(m.get("stages", {}).items()))
        lines.append(f"| {name} | {fmt(m['accuracy'], '.0%')} | {fmt(m['slm_share'], '.0%')} | {fmt(m['cost'], '.2f')} | "
                     f"{fmt(m['pgr'], '.2f')} | {fmt(m['apgr'], '.2f')} | {m['latency_p50_s']:.1f} / {m['latency_p95_s']:.1f} | "
                     f"{fmt(m['overhead_share'], '.1%')} | {stages} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(markdown(json.loads(Path(path).read_text())))
        print()
