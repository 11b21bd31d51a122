#!/usr/bin/env python3
"""A framework agent, unchanged, through hera-ray's step mode: task success, SLM share of calls,
cost against all-llm and tool-call parse failures; writes bench/results/agent_dropin.json.

The agent is LangChain's ``ChatOpenAI`` with ``bind_tools`` in the usual loop (call the model,
run the Python tools it asked for, send the results back, stop when it answers without a call,
at most ``--max-turns`` calls). The tasks (``tasks()``) are 36 arithmetic and lookup questions
with integer answers, each needing one to three tool calls; a task succeeds when the final reply
holds the right number. Each call's placement, cost and parse failures are read from the
response's ``hera`` field (an httpx response hook; LangChain itself is untouched).

    hera up --local-edges 1
    python bench/agent_dropin.py --policies all-llm,all-slm,hera-verify [--n 36]

A task that fails is counted by what the client saw (``error_kind``): ``errors_5xx`` (the server
answered 500-599), ``errors_4xx``, ``connection_errors`` (no answer: the ingress down or
unreachable), ``timeouts`` (no answer within 600 s) or ``other_errors`` (raised on this side).
**Target:** 0 parse failures that reach the client as a 5xx; from outside a 5xx cannot be told
apart from a parse failure's, so every 5xx counts (``targets.parse_failures_as_5xx``). The JSON is
written after each policy, so a run that stops keeps the policies it finished.

Needs the running cluster (``hera up``), the bundled pair, and langchain-openai (make install).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

SYSTEM = ("You are a helpful assistant. Use the tools to compute and to look things up; once a "
          "<tool_response> gives you what you need, reply to the user with the final answer as a number "
          "and do not call any tool again.")
POPULATION = {"Avalon": 1200, "Brindle": 860, "Corvale": 4300, "Dunmore": 515, "Elsworth": 2750, "Fenwick": 96}


def tasks() -> list[tuple[str, int]]:
    """(question, answer): 12 one-call products, 12 two-call sums of products, 12 lookups."""
    out = []
    for i in range(12):
        a, b = 13 + 7 * i, 11 + 3 * i
        out.append((f"What is {a} times {b}?", a * b))
    for i in range(12):
        a, b, c = 6 + i, 9 + 2 * i, 40 + 5 * i
        out.append((f"What is {a} times {b}, plus {c}?", a * b + c))
    towns = list(POPULATION)
    for i in range(12):
        town, k = towns[i % len(towns)], 2 + i % 4
        out.append((f"What is the population of {town}, multiplied by {k}?", POPULATION[town] * k))
    return out


def make_tools():
    from langchain_core.tools import tool

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        return a * b

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers and return the sum."""
        return a + b

    @tool
    def population(town: str) -> int:
        """The population of a town, by its name."""
        if town not in POPULATION:
            raise ValueError(f"unknown town {town!r}")
        return POPULATION[town]

    return {t.name: t for t in (multiply, add, population)}


#: How a failed task ended, as the client saw it (the summary's keys, in the table's order).
ERROR_KINDS = ("errors_5xx", "errors_4xx", "connection_errors", "timeouts", "other_errors")


def status_kind(status: int) -> str:
    """The outcome of a call the server answered with HTTP ``status`` (an error status)."""
    return "errors_5xx" if status >= 500 else "errors_4xx" if status >= 400 else "other_errors"


def error_kind(e: BaseException) -> tuple[str, int | None]:
    """(kind, HTTP status or None) of a failed task's exception. LangChain re-raises openai's errors
    ``from`` them (a 5xx as ``OpenAIAPIError``, an ``InternalServerError``), and openai wraps
    httpx's: the status, or the lack of an answer, is read along ``__cause__`` / ``__context__``."""
    import httpx
    import openai

    chain: list[BaseException] = []
    while e is not None and all(e is not x for x in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        status = getattr(x, "status_code", None)
        if isinstance(status, int):
            return status_kind(status), status
    if any(isinstance(x, (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)) for x in chain):
        return "timeouts", None
    if any(isinstance(x, (openai.APIConnectionError, httpx.TransportError, ConnectionError)) for x in chain):
        return "connection_errors", None
    return "other_errors", None


def run_task(question: str, policy: str, base_url: str, api_key: str, max_turns: int, tools) -> dict:
    import httpx
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    calls: list[dict] = []

    def record(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/chat/completions") and response.status_code == 200:
            response.read()
            calls.append(response.json().get("hera", {}))

    client = httpx.Client(event_hooks={"response": [record]}, timeout=600)
    llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=f"step:{policy}", temperature=0, max_retries=0,
                     http_client=client).bind_tools(list(tools.values()))
    messages = [SystemMessage(SYSTEM), HumanMessage(question)]
    answer, error, kind, status, t0 = "", "", "", None, time.perf_counter()
    try:
        for _ in range(max_turns):
            reply = llm.invoke(messages)
            messages.append(reply)
            if not reply.tool_calls:
                answer = str(reply.content)
                break
            for call in reply.tool_calls:
                try:
                    result = tools[call["name"]].invoke(call["args"])
                except Exception as e:  # noqa: BLE001 - a bad call is the model's; it sees the error
                    result = f"error: {e}"
                messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
    except Exception as e:  # noqa: BLE001 - a failed request is recorded, the run goes on
        error = f"{type(e).__name__}: {str(e)[:300]}"
        kind, status = error_kind(e)
    finally:
        client.close()
    return {"calls": calls, "answer": answer, "error": error, "error_kind": kind, "status": status,
            "wall_s": time.perf_counter() - t0}


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per policy: task success, calls, SLM share of calls, cost (absolute, and against all-llm's once
    all-llm has run), tool-call parse failures, and the failed tasks by kind (``ERROR_KINDS``)."""
    llm_cost = sum(c.get("cost", 0.0) for r in runs.get("all-llm", []) for c in r["calls"]) or None
    summary = {}
    for p, rs in runs.items():
        calls = [c for r in rs for c in r["calls"]]
        cost = sum(c.get("cost", 0.0) for c in calls)
        kinds = Counter(r.get("error_kind") or "other_errors" for r in rs if r["error"])
        summary[p] = {"n": len(rs), "success": sum(r["correct"] for r in rs) / len(rs) if rs else 0.0,
                      "calls": len(calls), "slm_share": sum(c.get("placement") == "edge" for c in calls) / len(calls) if calls else 0.0,
                      "cost_abs": cost, "cost": cost / llm_cost if llm_cost else None,
                      "parse_failures": sum(len(c.get("tool_parse_failures") or ()) for c in calls),
                      **{k: kinds.get(k, 0) for k in ERROR_KINDS},
                      "errors": sum(bool(r["error"]) for r in rs)}
    return summary


def targets(summary: dict[str, dict]) -> dict[str, dict]:
    """The issue's target: 0 parse failures that reach the client as a 5xx, over every policy. From
    outside a 5xx cannot be told apart from a parse failure's, so every 5xx counts. Tasks that got no
    answer (``unanswered_tasks``: connection errors, timeouts) could not show one either way."""
    n5xx = sum(m["errors_5xx"] for m in summary.values())
    unanswered = sum(m["connection_errors"] + m["timeouts"] for m in summary.values())
    return {"parse_failures_as_5xx": {"target": 0, "measured": n5xx, "met": n5xx == 0, "unanswered_tasks": unanswered}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", default="all-llm,all-slm,hera-verify")
    ap.add_argument("--n", type=int, default=36)
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--url", default=os.environ.get("HERA_URL"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "agent_dropin.json")
    args = ap.parse_args()
    console = Console()

    from hera_ray.eval.bench import git_commit, resolve_url
    from hera_ray.eval.scorers import gsm8k_correct

    base_url = resolve_url(args.url).rstrip("/") + "/v1"
    api_key = os.environ.get("HERA_API_KEY", "none")
    items = tasks()[: args.n]
    tools = make_tools()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    head = {"command": "python " + " ".join(sys.argv), "commit": git_commit(ROOT), "url": base_url, "tasks": len(items),
            "policies_requested": policies}
    runs: dict[str, list[dict]] = {}
    result: dict = {}
    with Progress(console=console) as progress:
        for p in policies:
            task = progress.add_task(f"step:{p}", total=len(items))
            rs: list[dict] = []
            for question, gold in items:
                r = run_task(question, p, base_url, api_key, args.max_turns, tools)
                r.update(question=question, gold=gold, correct=bool(r["answer"]) and gsm8k_correct(r["answer"], str(gold)))
                rs.append(r)
                progress.advance(task)
            runs[p] = rs
            # After each policy: a run that stops later keeps what it measured.
            summary = summarize(runs)
            result = {**head, "complete": len(runs) == len(policies), "policies": summary, "targets": targets(summary),
                      "runs": runs}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary, verdict = result.get("policies", {}), result.get("targets", {})
    table = Table(title=f"LangChain tool-calling agent in step mode ({len(items)} tasks)")
    for col in ("policy", "success", "calls", "SLM share", "cost vs all-llm", "parse failures", "5xx", "4xx",
                "connection errors", "timeouts", "other errors"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p, m in summary.items():
        table.add_row(f"step:{p}", f"{m['success']:.0%}", str(m["calls"]), f"{m['slm_share']:.0%}",
                      "—" if m["cost"] is None else f"{m['cost']:.2f}", str(m["parse_failures"]),
                      *(str(m[k]) for k in ERROR_KINDS))
    console.print(table)
    for k, v in verdict.items():
        console.print(f"target {k.replace('_', ' ')} = {v['target']}: measured {v['measured']} — "
                      + ("[green]met[/]" if v["met"] else "[red]missed[/]"))
        if v.get("unanswered_tasks"):
            console.print(f"[yellow]{v['unanswered_tasks']} task(s) got no answer (connection errors, timeouts): "
                          "they could not show a 5xx[/]")
    console.print(f"wrote {args.out}")
    return 0 if all(v["met"] for v in verdict.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
