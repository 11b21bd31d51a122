"""The agent loop over the real Router (plain code, no Ray) and a scripted stand-in executor:
what the trace records, and speculative SSE keeping or discarding the SLM's step."""

from __future__ import annotations

import asyncio

import pytest

from hera_ray.agent import Agent
from hera_ray.config import AgentConfig
from hera_ray.errors import Unavailable
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


class FailingExecutor(ScriptedExecutor):
    """Stand-in executor whose first calls fail the way real ones do: named edge nodes are gone
    (the gRPC error a dead or frozen node gives), and the cloud replica dies ``cloud_deaths`` times."""

    def __init__(self, dead_addresses=(), cloud_deaths=0):
        super().__init__("Subtask: add\nResult: 5", "Subtask: add\nResult: 5")
        self.dead, self.cloud_deaths = set(dead_addresses), cloud_deaths

    async def edge(self, address, params):
        if address in self.dead:
            self.calls.append(f"dead {address}")
            raise Unavailable(f"edge node at {address}: UNAVAILABLE: connection refused")
        return await super().edge(address, params)

    async def cloud(self, params):
        if self.cloud_deaths:
            self.cloud_deaths -= 1
            self.calls.append("dead cloud")
            raise Unavailable("cloud replica failed during the call (ActorDiedError)")
        return await super().cloud(params)


def _two_node_agent(executor, **config):
    table = NodeTable()
    for i in range(2):
        table.register(NodeSpec(f"e{i}", f"127.0.0.1:{i + 1}", "slm", 2048, 1, 0, 0.0), "t")
    router = Router(table, build_policies(), "slm", "llm", 2.0)
    return Agent(RouterScheduler(router), executor, AgentConfig(max_steps=1, retry_backoff_s=0, **config)), router


def test_a_dead_edge_node_is_retried_on_another_and_the_trace_names_it():
    executor = FailingExecutor(dead_addresses={"127.0.0.1:1"})
    agent, router = _two_node_agent(executor)
    (t,) = asyncio.run(agent.run("2+3?", "all-slm")).trace
    assert executor.calls == ["dead 127.0.0.1:1", "edge"]
    assert (t.node, t.retries, t.output) == ("e1", 1, "5")
    assert t.failures == ["e0: edge node at 127.0.0.1:1: UNAVAILABLE: connection refused"]
    # the failed node is avoided by the next request too, before the registry marks it down
    (t2,) = asyncio.run(agent.run("2+3?", "all-slm")).trace
    assert t2.node == "e1" and t2.failures == []
    assert router.outstanding == {"e0": 0, "e1": 0}


def test_with_every_edge_node_dead_the_subtask_falls_back_to_the_cloud():
    executor = FailingExecutor(dead_addresses={"127.0.0.1:1", "127.0.0.1:2"})
    agent, _ = _two_node_agent(executor)
    (t,) = asyncio.run(agent.run("2+3?", "all-slm")).trace
    assert (t.placement, t.fallback, t.retries) == ("cloud", "no-edge", 2)


def test_a_dead_cloud_replica_is_retried_and_gives_up_after_cloud_retries():
    agent, _ = _two_node_agent(FailingExecutor(cloud_deaths=2), cloud_retries=3)
    (t,) = asyncio.run(agent.run("2+3?", "all-llm")).trace
    assert (t.placement, t.retries, t.output) == ("cloud", 2, "5")
    assert t.failures == ["cloud: cloud replica failed during the call (ActorDiedError)"] * 2
    agent, _ = _two_node_agent(FailingExecutor(cloud_deaths=5), cloud_retries=1)
    with pytest.raises(Unavailable, match="cloud replica failed"):
        asyncio.run(agent.run("2+3?", "all-llm"))
