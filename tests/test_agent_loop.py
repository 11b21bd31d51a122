"""The agent loop over the real Router (plain code, no Ray) and a scripted stand-in executor:
what the trace records, and speculative SSE keeping or discarding the SLM's step."""

from __future__ import annotations

import asyncio

from hera_ray.agent import Agent
from hera_ray.config import AgentConfig
from hera_ray.generation import GenerationResult
from hera_ray.policy import build_policies
from hera_ray.policy.hera import HeraPolicyConfig
from hera_ray.scheduler.nodes import NodeSpec, NodeTable
from hera_ray.scheduler.router import RouteRequest, Router, SubtaskReport
from hera_ray.policy.base import PastStep, Placement

from test_hera_policy import ScriptedEstimators


class RouterScheduler:
    """The agent's Scheduler interface over a Router in process (the actor does the same over Ray)."""

    def __init__(self, router: Router):
        self.router = router

    async def route(self, request, max_cloud_cost=None):
        req = RouteRequest(request["request_id"], request["policy"], request["index"], request.get("question", ""),
                           tuple(PastStep(h["subtask"], h["output"], Placement(h["placement"])) for h in request["history"]),
                           tuple(request.get("exclude_nodes", ())), request.get("slm_candidate"))
        return (await self.router.route(req, max_cloud_cost)).to_dict()

    async def report(self, report):
        return self.router.report(SubtaskReport(report["request_id"], Placement(report["placement"]), report["node_id"],
                                                report.get("prompt_tokens", 0), report.get("completion_tokens", 0),
                                                report["price_per_1k_tokens"], report.get("ok", True)))

    async def finish(self, request_id):
        return self.router.finish(request_id).to_dict()


class ScriptedExecutor:
    """Stand-in for the edge and cloud models: each side writes a scripted step."""

    def __init__(self, edge_text, cloud_text):
        self.edge_text, self.cloud_text, self.calls = edge_text, cloud_text, []

    async def edge(self, address, params):
        self.calls.append("edge")
        return GenerationResult(self.edge_text, 10, 5, 0.01, 0.02, 0.0, "stop")

    async def cloud(self, params):
        self.calls.append("cloud")
        return GenerationResult(self.cloud_text, 10, 5, 0.01, 0.02, 0.0, "stop")


def agent_for(est, edge_text, cloud_text):
    table = NodeTable()
    table.register(NodeSpec("e0", "127.0.0.1:1", "slm", 2048, 1, 0, 0.0), "t")
    router = Router(table, build_policies(estimators=est, hera=HeraPolicyConfig(use_urc=False, use_cd=False, use_sd=False)),
                    "slm", "llm", 2.0)
    executor = ScriptedExecutor(edge_text, cloud_text)
    return Agent(RouterScheduler(router), executor, AgentConfig(max_steps=1)), executor, router


def test_speculation_accepted_keeps_the_slm_step_and_runs_nothing_else():
    est = ScriptedEstimators(sims={("add them", "l"): 0.95})
    agent, executor, router = agent_for(est, "Subtask: add them\nResult: 5", "Subtask: sum\nResult: 5")
    run = asyncio.run(agent.run("2+3?", "hera-spec"))
    (t,) = run.trace
    assert executor.calls == ["edge"]
    assert (t.placement, t.stage, t.node, t.subtask, t.output) == ("edge", "sse", "e0", "add them", "5")
    assert t.speculative_s == 0.0 and t.scores["sse_sim"] == 0.95
    assert router.outstanding["e0"] == 0  # both node picks were released


def test_speculation_rejected_runs_the_llm_and_reports_the_wasted_slm_time():
    est = ScriptedEstimators(sims={("guess", "l"): 0.1})
    agent, executor, router = agent_for(est, "Subtask: guess\nResult: 7", "Subtask: sum\nResult: 5")
    run = asyncio.run(agent.run("2+3?", "hera-spec"))
    (t,) = run.trace
    assert executor.calls == ["edge", "cloud"]
    assert (t.placement, t.stage, t.subtask, t.output) == ("cloud", "llm", "sum", "5")
    assert t.speculative_s > 0.0 and t.cost > 0.0
    assert router.outstanding["e0"] == 0


def test_plain_hera_does_not_speculate():
    est = ScriptedEstimators(sims={("s", "l"): 0.95})
    agent, executor, _ = agent_for(est, "Subtask: a\nResult: 1", "Subtask: b\nResult: 2")
    (t,) = asyncio.run(agent.run("q", "hera")).trace
    assert executor.calls == ["edge"] and t.stage == "sse" and "sp_slm:0" in est.calls
