"""The agent loop over the real Router (plain code, no Ray) and a scripted stand-in executor:
what the trace records, and speculative SSE keeping or discarding the SLM's step."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from hera_ray.agent import Agent, StepFormat
from hera_ray.config import AgentConfig
from hera_ray.errors import Unavailable
from hera_ray.generation import GenerationResult
from hera_ray.policy import build_policies
from hera_ray.policy.hera import HeraPolicyConfig
from hera_ray.pricing import FREE, PriceSheet
from hera_ray.scheduler.nodes import NodeSpec, NodeTable
from hera_ray.scheduler.router import Router

from agent_helpers import RouterScheduler
from test_hera_policy import ScriptedEstimators


class ScriptedExecutor:
    """Stand-in for the edge and cloud models: each side writes a scripted line, ending it as the
    real engines do (the newline token kept, stop_reason "\n")."""

    def __init__(self, edge_text, cloud_text):
        self.edge_text, self.cloud_text, self.calls = edge_text, cloud_text, []

    async def edge(self, address, params):
        self.calls.append("edge")
        return GenerationResult(self.edge_text, 10, 5, 0.01, 0.02, 0.0, "stop", stop_reason="\n")

    async def cloud(self, params):
        self.calls.append("cloud")
        return GenerationResult(self.cloud_text, 10, 5, 0.01, 0.02, 0.0, "stop", stop_reason="\n")


def agent_for(est, edge_text, cloud_text):
    table = NodeTable()
    table.register(NodeSpec("e0", "127.0.0.1:1", "slm", 2048, 1, 0, FREE), "t")
    router = Router(table, build_policies(estimators=est, hera=HeraPolicyConfig(use_urc=False, use_cd=False, use_sd=False)),
                    "slm", "llm", PriceSheet.flat(2.0))
    executor = ScriptedExecutor(edge_text, cloud_text)
    return Agent(RouterScheduler(router), executor, AgentConfig(max_steps=1)), executor, router


def test_speculation_accepted_keeps_the_slm_step_and_runs_nothing_else():
    est = ScriptedEstimators(sims={("add them", "l"): 0.95})
    agent, executor, router = agent_for(est, "add them\n", "sum\n")
    run = asyncio.run(agent.run("2+3?", "hera-spec"))
    (t,) = run.trace
    assert executor.calls == ["edge"]
    assert (t.placement, t.stage, t.node, t.subtask, t.output) == ("edge", "sse", "e0", "add them", "add them\n")
    assert t.speculative_s == 0.0 and t.scores["sse_sim"] == 0.95
    assert router.outstanding["e0"] == 0  # both node picks were released


def test_speculation_rejected_runs_the_llm_and_reports_the_wasted_slm_time():
    est = ScriptedEstimators(sims={("guess", "l"): 0.1})
    agent, executor, router = agent_for(est, "guess\n", "sum\n")
    run = asyncio.run(agent.run("2+3?", "hera-spec"))
    (t,) = run.trace
    assert executor.calls == ["edge", "cloud"]
    assert (t.placement, t.stage, t.subtask, t.output) == ("cloud", "llm", "sum", "sum\n")
    assert t.speculative_s > 0.0 and t.cost > 0.0
    assert router.outstanding["e0"] == 0


def test_plain_hera_does_not_speculate():
    est = ScriptedEstimators(sims={("s", "l"): 0.95})
    agent, executor, _ = agent_for(est, "a\n", "b\n")
    (t,) = asyncio.run(agent.run("q", "hera")).trace
    assert executor.calls == ["edge"] and t.stage == "sse" and "sp_slm:0" in est.calls


class FailingExecutor(ScriptedExecutor):
    """Stand-in executor whose first calls fail the way real ones do: named edge nodes are gone
    (the gRPC error a dead or frozen node gives), and the cloud replica dies ``cloud_deaths`` times."""

    def __init__(self, dead_addresses=(), cloud_deaths=0):
        super().__init__("2 + 3 = 5\n", "2 + 3 = 5\n")
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
        table.register(NodeSpec(f"e{i}", f"127.0.0.1:{i + 1}", "slm", 2048, 1, 0, FREE), "t")
    router = Router(table, build_policies(), "slm", "llm", PriceSheet.flat(2.0))
    return Agent(RouterScheduler(router), executor, AgentConfig(**{"max_steps": 1, "retry_backoff_s": 0, **config})), router


def test_a_dead_edge_node_is_retried_on_another_and_the_trace_names_it():
    executor = FailingExecutor(dead_addresses={"127.0.0.1:1"})
    agent, router = _two_node_agent(executor)
    (t,) = asyncio.run(agent.run("2+3?", "all-slm")).trace
    assert executor.calls == ["dead 127.0.0.1:1", "edge"]
    assert (t.node, t.retries, t.output) == ("e1", 1, "2 + 3 = 5\n")
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
    assert (t.placement, t.retries, t.output) == ("cloud", 2, "2 + 3 = 5\n")
    assert t.failures == ["cloud: cloud replica failed during the call (ActorDiedError)"] * 2
    agent, _ = _two_node_agent(FailingExecutor(cloud_deaths=5), cloud_retries=1)
    with pytest.raises(Unavailable, match="cloud replica failed"):
        asyncio.run(agent.run("2+3?", "all-llm"))


class LinesExecutor:
    """Stand-in engine that writes a scripted chain one line per call, the last one ending the message."""

    def __init__(self, lines):
        self.lines, self.params = list(lines), []

    async def _next(self, params):
        self.params.append(params)
        i = len(self.params) - 1
        last = i == len(self.lines) - 1
        return GenerationResult(self.lines[i], 20 + 5 * i, 8, 0.01, 0.02, 0.0, "stop", stop_reason="" if last else "\n")

    async def edge(self, address, params):
        return await self._next(params)

    async def cloud(self, params):
        return await self._next(params)


LINES = ["Each box has 8 pencils.\n", "3 * 8 = 24 pencils.\n\n", "24 - 10 = 14.\n", "Answer: 14"]


def test_the_chain_is_one_open_message_and_the_answer_is_read_from_it():
    executor = LinesExecutor(LINES)
    agent, _ = _two_node_agent(executor, max_steps=10)
    run = asyncio.run(agent.run("Tom has 3 boxes of 8 pencils and gives away 10. How many are left?", "all-llm"))
    assert [t.output for t in run.trace] == LINES and run.chain == "".join(LINES)
    assert (run.answer, run.finished) == ("14", True)
    first, *later = executor.params
    assert not first.continue_final_message and [m[0] for m in first.messages] == ["system", "user"]  # as one turn
    for i, params in enumerate(later, 1):  # step i continues the message the steps before it opened
        assert params.continue_final_message and params.stop_at_line_end
        assert params.messages[-1] == ("assistant", "".join(LINES[:i]))
    # The cloud's prompt cache holds the previous call's prompt: only the newest line is new input.
    assert [t.cached_prompt_tokens for t in run.trace] == [0, 20, 25, 30]
    assert [t.uncached_prompt_tokens for t in run.trace] == [20, 5, 5, 5]


def test_the_chain_stops_at_its_token_cap_and_its_step_limit():
    agent, _ = _two_node_agent(LinesExecutor(LINES), max_steps=10, max_chain_tokens=16)  # 8 tokens a line
    run = asyncio.run(agent.run("q", "all-slm"))
    assert len(run.trace) == 2 and not run.finished and run.answer == "3 * 8 = 24 pencils."
    agent, _ = _two_node_agent(LinesExecutor(LINES), max_steps=3)
    assert len(asyncio.run(agent.run("q", "all-slm")).trace) == 3


def test_an_endpoint_that_cannot_continue_gets_the_turns_fallback_and_the_trace_says_so():
    executor = LinesExecutor(["3 * 8 = 24.", "Answer: 24"])
    table = NodeTable()
    router = Router(table, build_policies(), "slm", "llm", PriceSheet.flat(2.0))
    agent = Agent(RouterScheduler(router), executor, AgentConfig(max_steps=5), cloud_step_format=StepFormat.TURNS)
    run = asyncio.run(agent.run("q", "all-llm"))
    assert [t.step_format for t in run.trace] == ["turns", "turns"]
    assert not executor.params[1].continue_final_message
    assert [m[0] for m in executor.params[1].messages] == ["system", "user", "assistant", "user"]
    assert run.chain == "3 * 8 = 24.\nAnswer: 24"  # the dropped newline is put back
    assert run.trace[1].cached_prompt_tokens == 0  # a closed turn does not extend the last prompt


class CannotScore(ScriptedExecutor):
    """A cloud backend that cannot score a candidate (the OpenAI backend refuses, as it does for real)."""

    async def edge(self, address, params):
        self.calls.append("edge")
        return GenerationResult(self.edge_text, 10, 5, 0.01, 0.02, 0.0, "stop", stop_reason="\n", logprobs=[-1.0] * 5)

    async def cloud(self, params):
        if params.candidate:
            self.calls.append("check")
            from hera_ray.errors import InvalidRequest

            raise InvalidRequest("the OpenAI-compatible endpoint behind 'llm' cannot score a candidate")
        return await super().cloud(params)


def test_when_the_cloud_cannot_check_a_step_the_llm_writes_it_and_the_trace_says_why():
    from hera_ray.policy.verify import VerifyConfig, VerifyPolicy

    table = NodeTable()
    table.register(NodeSpec("e0", "127.0.0.1:1", "slm", 2048, 1, 0, FREE), "t")
    verify = VerifyPolicy(VerifyConfig(keep=0.9, confidence_keep=1.01))  # confidence 0.37: borderline
    router = Router(table, build_policies(verify=verify), "slm", "llm", PriceSheet.flat(2.0))
    executor = CannotScore("2 + 3 = 6\n", "2 + 3 = 5\n")
    agent = Agent(RouterScheduler(router), executor, AgentConfig(max_steps=1))
    run = asyncio.run(agent.run("2+3?", "hera-verify"))
    (t,) = run.trace
    assert executor.calls == ["edge", "check", "cloud"]
    assert (t.placement, t.stage, t.output, t.rejected_output) == ("cloud", "llm-rewrite", "2 + 3 = 5\n", "2 + 3 = 6\n")
    assert "cannot score a candidate" in t.check_error and t.check_cost == 0.0
    assert t.speculative_s > 0 and t.cost > 0 and run.cost == pytest.approx(t.cost)  # the edge is free here
    assert router.outstanding["e0"] == 0


class TwoSidedLines:
    """Stand-in engines: the edge writes ``slm`` lines with token log-probabilities ``slm_logprob``
    each (when asked for them), the cloud writes ``llm`` lines; each side's last line ends the message."""

    def __init__(self, slm, llm, slm_logprob):
        self.sides = {"edge": list(slm), "cloud": list(llm)}
        self.slm_logprob, self.calls, self.params = slm_logprob, [], []

    async def _next(self, side, params):
        self.calls.append(side)
        self.params.append(params)
        lines = self.sides[side]
        i = sum(c == side for c in self.calls) - 1
        last = i == len(lines) - 1
        lps = [self.slm_logprob] * 4 if params.logprobs and side == "edge" else None
        return GenerationResult(lines[i], 20, 4, 0.01, 0.02, 0.0, "stop", stop_reason="" if last else "\n", logprobs=lps)

    async def edge(self, address, params):
        return await self._next("edge", params)

    async def cloud(self, params):
        return await self._next("cloud", params)


@pytest.mark.parametrize("logprob, escalates", [(-0.01, False), (-1.0, True)])
def test_a_cascade_keeps_a_confident_slm_answer_and_else_pays_for_the_llm_to_answer_again(logprob, escalates):
    import math

    executor = TwoSidedLines(["3 * 8 = 24.\n", "Answer: 24"], ["Each box has 8.\n", "8 * 3 = 24.\n", "Answer: 24"],
                             logprob)
    agent, router = _two_node_agent(executor, max_steps=10)
    run = asyncio.run(agent.run("3 boxes of 8?", "cascade@0.9"))
    assert all(p.logprobs for side, p in zip(executor.calls, executor.params) if side == "edge")
    assert run.review["scores"]["slm_confidence"] == pytest.approx(math.exp(logprob))
    assert run.answer == "24" and not any(router.outstanding.values())  # every node pick released
    slm_steps = [t for t in run.trace if t.placement == "edge"]
    assert [t.stage for t in slm_steps] == ["cascade-slm"] * 2
    if not escalates:
        assert run.review["stage"] == "cascade-accept" and executor.calls == ["edge", "edge"]
        assert run.chain == "3 * 8 = 24.\nAnswer: 24" and run.cost == 0.0
    else:
        assert run.review["stage"] == "cascade-escalate" and executor.calls == ["edge", "edge", "cloud", "cloud", "cloud"]
        assert [t.discarded for t in run.trace] == [True, True, False, False, False]
        assert [t.stage for t in run.trace[2:]] == ["cascade-llm"] * 3 and [t.index for t in run.trace[2:]] == [0, 1, 2]
        # The LLM starts from the question alone: the SLM's chain is gone from its prompt and from the answer's chain.
        first_llm = executor.params[2]
        assert not first_llm.continue_final_message and "3 * 8" not in str(first_llm.messages)
        assert run.chain == "Each box has 8.\n8 * 3 = 24.\nAnswer: 24"
        assert run.cost == pytest.approx(sum(t.cost for t in run.trace[2:])) and run.cost > 0
        assert run.review["decision_s"] > 0 and run.trace[1].decision_s >= run.review["decision_s"]


class TooLongForTheEdge:
    """Stand-in engines: the edge's context window is too small for the call; the cloud answers."""

    def __init__(self):
        self.calls = []

    async def edge(self, address, params):
        from hera_ray.errors import ContextLengthExceeded

        self.calls.append("edge")
        raise ContextLengthExceeded("the prompt is 3000 tokens: exceeds the context window of 2048 tokens")

    async def cloud(self, params):
        self.calls.append("cloud")
        return GenerationResult("Blue.", 3000, 2, 0.01, 0.02, 0.0, "stop")


def test_a_step_mode_call_too_long_for_the_edge_runs_on_the_cloud_and_its_session_is_the_policy_s_request():
    import json

    from hera_ray.generation import GenerationParams
    from hera_ray.policy.base import Decision, Placement, Policy

    seen = []

    class EdgeFirst(Policy):
        name = "edge-first"

        async def decide(self, ctx):
            seen.append((ctx.request_id, ctx.index, [h.subtask for h in ctx.history]))
            return Decision(Placement.EDGE, "edge-first")

    executor = TooLongForTheEdge()
    agent, router = _two_node_agent(executor)
    router.policies["edge-first"] = EdgeFirst()
    call = GenerationParams(chat=json.dumps([{"role": "user", "content": "Name a colour."}]), max_tokens=16)
    history = [{"subtask": "Red.", "output": "Red.", "placement": "edge"}]
    entry = asyncio.run(agent.call(call, "edge-first", "alice:conv-1", 1, "Name a colour.", history))
    assert executor.calls == ["edge", "cloud"] and entry.placement == "cloud" and entry.fallback == "context"
    assert "context window" in entry.failures[0] and entry.output == "Blue."
    assert seen[0] == ("alice:conv-1", 1, ["Red."])  # the policy sees the session and the conversation before the call
    assert not any(router.outstanding.values())  # the edge the refused call was sent to is free again
    assert router.ledger._requests == {}  # the call's ledger entry is closed; the session holds no open bill


def test_step_mode_calls_of_a_session_reuse_the_prompt_a_provider_caches():
    import json

    from hera_ray.generation import GenerationParams

    executor = LinesExecutor(["Let me look.", "It is 5.", "Fine."])
    agent, _ = _two_node_agent(executor)
    convo = [{"role": "user", "content": "What is 2 + 3?"}]
    first = asyncio.run(agent.call(GenerationParams(chat=json.dumps(convo), max_tokens=8), "all-llm", "s1", 0, "q", []))
    convo += [{"role": "assistant", "content": "Let me look."}, {"role": "user", "content": "Go on."}]
    second = asyncio.run(agent.call(GenerationParams(chat=json.dumps(convo), max_tokens=8), "all-llm", "s1", 1, "q", []))
    other = asyncio.run(agent.call(GenerationParams(chat=json.dumps(convo), max_tokens=8), "all-llm", "s2", 1, "q", []))
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == first.prompt_tokens  # the conversation so far was the last call's prompt
    assert other.cached_prompt_tokens == 0  # another session: nothing cached for it


class ScoredLines:
    """Stand-in pair for hera-verify's batched checks. The edge writes ``script[i]`` at chain
    position i (so it writes the same step again after a rewrite), with log-probabilities that make
    every step borderline; the cloud rewrites position i as "fixed i", and scores a candidate word
    by word (a "token" a word): a word holding "WRONG" scores far below the LLM's own choice. A
    candidate in segments (candidate_splits) gets per-segment counts, as the engines return them,
    and a check that may write (rewrite_below) writes in place of the first segment under its bar,
    as the engines do, and stops reading there, as llama.cpp does (``stops_reading``)."""

    stops_reading = True

    def __init__(self, script, wrong_logprob=-1.0):
        self.script, self.calls, self.on_step = list(script), [], []
        #: The SLM's token log-probability on a line holding "WRONG" (others: -1.0).
        self.wrong_logprob = wrong_logprob

    @staticmethod
    def position(params):
        chain = params.messages[-1][1] if params.continue_final_message else ""
        return chain.count("\n")

    async def edge(self, address, params):
        i = self.position(params)
        self.calls.append(("edge", i, params))
        last = i == len(self.script) - 1
        lp = self.wrong_logprob if "WRONG" in self.script[i] else -1.0
        return GenerationResult(self.script[i], 10 + i, 4, 0.01, 0.02, 0.0, "stop", stop_reason="" if last else "\n",
                                logprobs=[lp] * 4)

    async def cloud(self, params):
        from hera_ray.generation import candidate_segments

        i = self.position(params)
        if not params.candidate:
            self.calls.append(("write", i, params))
            last = i == len(self.script) - 1
            text = "Answer: fixed" if last else f"fixed {i}\n"
            return GenerationResult(text, 10 + i, 4, 0.01, 0.02, 0.0, "stop", stop_reason="" if last else "\n")
        self.calls.append(("check", i, params))
        words = [s.split() or [s] for s in candidate_segments(params)]
        lps = [-3.0 if "WRONG" in w else -0.1 for seg in words for w in seg]
        counts = [len(seg) for seg in words]
        scored = GenerationResult("", 10 + i + len(lps), 0, 0.01, 0.0, 0.0, "score", logprobs=lps,
                                  top_logprobs=[-0.1] * len(lps), segment_tokens=counts if params.candidate_splits else None)
        k = self.rewrites_at(params, lps, counts)
        if k is None:
            return scored
        j = i + k  # each step is one segment
        last = j == len(self.script) - 1
        if self.stops_reading:
            n = sum(counts[:k + 1])
            scored = replace(scored, prompt_tokens=10 + i + n, logprobs=lps[:n], top_logprobs=[-0.1] * n,
                             segment_tokens=counts[:k + 1] if params.candidate_splits else None)
        return replace(scored, text="Answer: fixed" if last else f"fixed {j}\n", completion_tokens=4,
                       finish_reason="stop", stop_reason="" if last else "\n", rewritten_segment=k)

    @staticmethod
    def rewrites_at(params, lps, counts):
        from hera_ray.generation import first_rejected

        return first_rejected(params, lps, [-0.1] * len(lps), counts) if params.rewrite_below else None


SCRIPT = ["a = 1\n", "b = WRONG + 1\n", "c = 3\n", "d = 4\n", "e = WRONG + 1\n", "Answer: 5"]


def _verify_agent(executor, check_batch, batch_above=0.0, check_writes=False):
    from hera_ray.policy.verify import VerifyConfig, VerifyPolicy

    table = NodeTable()
    table.register(NodeSpec("e0", "127.0.0.1:1", "slm", 2048, 1, 0, FREE), "t")
    verify = VerifyPolicy(VerifyConfig(keep=0.9, confidence_keep=1.01, check_batch=check_batch,  # all borderline
                                       batch_above=batch_above, check_writes=check_writes))
    router = Router(table, build_policies(verify=verify), "slm", "llm", PriceSheet.flat(2.0))
    return Agent(RouterScheduler(router), executor, AgentConfig(max_steps=20)), router


def _run_verify(check_batch, check_writes=False, executor=None):
    executor = executor or ScoredLines(SCRIPT)
    agent, router = _verify_agent(executor, check_batch, check_writes=check_writes)
    run = asyncio.run(agent.run("q", "hera-verify", on_step=executor.on_step.append))
    return run, executor, router


def test_batched_checks_decide_every_step_as_one_check_each_does_in_fewer_prefills():
    one, one_calls, _ = _run_verify(1)
    batched, calls, router = _run_verify(3)
    # The same chain and the same decision for every step it holds.
    want = ["a = 1\n", "fixed 1\n", "c = 3\n", "d = 4\n", "fixed 4\n", "Answer: 5"]
    assert [t.output for t in one.trace] == want and one.chain == batched.chain == "".join(want)
    kept = [t for t in batched.trace if not t.discarded]
    assert [(t.stage, t.placement, t.output) for t in kept] == [(t.stage, t.placement, t.output) for t in one.trace]
    assert [t.scores["llm_score"] for t in kept] == pytest.approx([t.scores["llm_score"] for t in one.trace])
    assert [t.rejected_output for t in kept] == ["", "b = WRONG + 1\n", "", "", "e = WRONG + 1\n", ""]
    assert batched.answer == one.answer == "5" and batched.finished
    # Three prefills instead of six: steps 0-2 (2 discarded: written after the rejected step 1), 2-4, 5.
    checks = [(i, p) for side, i, p in calls.calls if side == "check"]
    assert len([c for c in one_calls.calls if c[0] == "check"]) == 6
    assert [i for i, _p in checks] == [0, 2, 5]
    assert [len(p.candidate_splits) for _i, p in checks] == [2, 2, 0]
    assert checks[0][1].candidate == "a = 1\nb = WRONG + 1\nc = 3\n" and checks[0][1].candidate_splits == (6, 20)
    (dropped,) = [t for t in batched.trace if t.discarded]
    assert (dropped.index, dropped.output, dropped.placement) == (2, "c = 3\n", "edge")
    # Each check is billed once, on the first step it scored; every cost is in the run's total.
    assert [t.check_steps for t in batched.trace] == [3, 0, 0, 3, 0, 0, 1]
    assert sum(t.check_cost > 0 for t in batched.trace) == 3
    assert batched.cost == pytest.approx(sum(t.cost + t.speculative_cost + t.check_cost for t in batched.trace))
    assert batched.usage["cloud_cost"] == pytest.approx(sum(t.cost + t.check_cost for t in batched.trace
                                                             if t.placement == "cloud" or t.check_cost))
    # A streaming client sees the final chain only, each step once it is decided.
    assert [t.output for t in calls.on_step] == want and not any(t.discarded for t in calls.on_step)
    assert router.outstanding["e0"] == 0
    # The rewrite after a batched check reads the prompt the check left in the LLM's cache.
    rewrite = next(t for t in kept if t.stage == "llm-rewrite")
    assert rewrite.cached_prompt_tokens == rewrite.prompt_tokens > 0


def test_held_steps_are_decided_before_the_llm_writes_after_them():
    """A policy that sends a step straight to the LLM while checks are held: they run first, and a
    rejection there means the step is asked for again at its new place."""
    from hera_ray.policy.base import Decision, Placement
    from hera_ray.policy.verify import VerifyConfig, VerifyPolicy

    class CloudAtTwo(VerifyPolicy):
        async def decide(self, ctx):
            if ctx.index == 2 and ctx.slm_candidate is None:
                return Decision(Placement.CLOUD, "llm")
            return await super().decide(ctx)

    executor = ScoredLines(SCRIPT)
    table = NodeTable()
    table.register(NodeSpec("e0", "127.0.0.1:1", "slm", 2048, 1, 0, FREE), "t")
    policy = CloudAtTwo(VerifyConfig(keep=0.9, confidence_keep=1.01, check_batch=3, check_writes=False))
    router = Router(table, build_policies(verify=policy), "slm", "llm", PriceSheet.flat(2.0))
    agent = Agent(RouterScheduler(router), executor, AgentConfig(max_steps=20))
    run = asyncio.run(agent.run("q", "hera-verify"))
    sides = [(side, i) for side, i, _p in executor.calls]
    # Steps 0 and 1 held; step 2 is the LLM's: the check of 0-1 runs first and rejects step 1.
    assert sides[:4] == [("edge", 0), ("edge", 1), ("check", 0), ("write", 1)]
    assert sides[4] == ("write", 2)  # then the LLM writes step 2 after the rewritten step 1
    assert [t.output for t in run.trace[:3]] == ["a = 1\n", "fixed 1\n", "fixed 2\n"]
    assert [t.stage for t in run.trace[:3]] == ["llm-check", "llm-rewrite", "llm"]
    assert router.outstanding["e0"] == 0


def test_a_batch_the_cloud_cannot_score_is_rewritten_from_its_first_step():
    class NoScores(ScoredLines):
        async def cloud(self, params):
            if params.candidate:
                from hera_ray.errors import InvalidRequest

                self.calls.append(("check", self.position(params), params))
                raise InvalidRequest("the OpenAI-compatible endpoint behind 'llm' cannot score a candidate")
            return await super().cloud(params)

    executor = NoScores(SCRIPT[:3])
    agent, _ = _verify_agent(executor, 2)
    run = asyncio.run(agent.run("q", "hera-verify"))
    kept = [t for t in run.trace if not t.discarded]
    assert [(t.stage, t.fallback, t.output) for t in kept] == [("llm-rewrite", "no-check", "fixed 0\n"),
                                                               ("llm-rewrite", "no-check", "fixed 1\n"),
                                                               ("llm-rewrite", "no-check", "Answer: fixed")]
    assert all("cannot score a candidate" in t.check_error for t in kept)


def test_a_step_likely_to_be_rejected_closes_its_batch_so_nothing_is_written_after_it():
    """batch_above: a borderline step under it in P(good) (here the SLM's confidence: 0.05 on the
    WRONG lines, 0.37 on the others) is checked at once, with the steps waiting before it."""
    executor = ScoredLines(SCRIPT, wrong_logprob=-3.0)
    agent, router = _verify_agent(executor, 3, batch_above=0.2)
    run = asyncio.run(agent.run("q", "hera-verify"))
    assert run.chain == "a = 1\nfixed 1\nc = 3\nd = 4\nfixed 4\nAnswer: 5"
    checks = [(i, len(p.candidate_splits)) for side, i, p in executor.calls if side == "check"]
    assert checks == [(0, 1), (2, 2), (5, 0)]  # steps 0-1 (closed by 1), 2-4 (closed by 4 and the cap), 5
    assert not any(t.discarded for t in run.trace) and len(run.trace) == 6
    assert [t.check_steps for t in run.trace] == [2, 0, 3, 0, 0, 1]
    assert router.outstanding["e0"] == 0


@pytest.mark.parametrize("check_batch", [1, 3])
def test_a_check_that_writes_decides_as_two_calls_do_and_reads_the_prompt_once(check_batch):
    """check_writes: the LLM writes the rejected step in the check's own call (rewrite_below). The
    chain, every decision and its scores are those of a check followed by a rewrite call; no
    rewrite call is made, and the rewritten step is billed its output tokens only (the check's
    call read the prompt)."""
    two, two_calls, _ = _run_verify(check_batch)
    one, calls, router = _run_verify(check_batch, check_writes=True)
    assert one.chain == two.chain == "a = 1\nfixed 1\nc = 3\nd = 4\nfixed 4\nAnswer: 5"
    kept = [t for t in one.trace if not t.discarded]
    want = [t for t in two.trace if not t.discarded]
    assert [(t.stage, t.output, t.rejected_output) for t in kept] == [(t.stage, t.output, t.rejected_output) for t in want]
    assert [t.scores for t in kept] == [t.scores for t in want]
    assert [side for side, _i, _p in two_calls.calls].count("write") == 2
    assert [side for side, _i, _p in calls.calls].count("write") == 0  # written by the checks
    assert sum(t.engine_calls for t in one.trace) == sum(t.engine_calls for t in two.trace) - 2
    checks = [p for side, _i, p in calls.calls if side == "check"]
    assert all(p.max_tokens > 0 and p.stop_at_line_end and p.rewrite_below for p in checks)
    for rewrite in (t for t in kept if t.stage == "llm-rewrite"):
        assert (rewrite.prompt_tokens, rewrite.completion_tokens) == (0, 4)
        assert rewrite.cost == pytest.approx(4 * 2.0 / 1e3)  # flat $2 per thousand tokens
    # Cheaper than the two calls by the rewrites' prompt re-reads (and, batched, by the steps after a
    # rejected one, which are not read), and every cost is in the total.
    saved = sum(t.prompt_tokens for t in want if t.stage == "llm-rewrite") * 2.0 / 1e3
    unread = {1: 0, 3: 3}[check_batch]  # batched: step 2 (3 words), after the rejected step 1
    assert one.cost == pytest.approx(two.cost - saved - unread * 2.0 / 1e3)
    if check_batch == 3:  # the first check reads steps 0 and 1 (3 + 5 words), not step 2 (3)
        assert (one.trace[0].check_prompt_tokens, two.trace[0].check_prompt_tokens) == (18, 21)
    assert one.cost == pytest.approx(sum(t.cost + t.speculative_cost + t.check_cost for t in one.trace))
    assert router.outstanding["e0"] == 0
    # What the check's call read stays in the LLM's cache for the next check, less the steps it
    # dropped: one check at a time, the prompt before step 1 (10 + 1 tokens); in a batch, that and
    # step 0's 3 scored words (10 + 0 + 11 read, less step 1's 5 and step 2's 3).
    later = next(t for t in kept if t.index > 1 and t.check_steps)
    assert later.check_cached_prompt_tokens == {1: 11, 3: 13}[check_batch]


def test_a_check_that_writes_after_a_step_that_carried_the_next_line_s_indentation_ends_that_step_at_its_newline():
    """A step can end with a newline token that holds the next line's indentation; the check scores
    it without that indentation (it opens the next step's segment), and a rewrite of the next step
    written in the check's call begins after the newline: the step before now ends there, and the
    new step brings its own indentation."""
    script = ["def f(x):\n    ", "return WRONG + 1\n", "Answer: 5"]
    run, calls, _ = _run_verify(3, check_writes=True, executor=ScoredLines(script))
    (check, *_rest) = [p for side, _i, p in calls.calls if side == "check"]
    assert check.candidate == "def f(x):\n    return WRONG + 1\nAnswer: 5" and check.candidate_splits == (10, 31)
    kept = [t for t in run.trace if not t.discarded]
    assert [t.output for t in kept][:2] == ["def f(x):\n", "fixed 1\n"]
    assert run.chain.startswith("def f(x):\nfixed 1\n")


def test_an_engine_that_writes_where_the_policy_keeps_the_step_is_billed_with_the_check():
    """The policy, asked again with the check's scores, decides: when the engine wrote in place of a
    step the policy keeps (an engine whose rule differs), what it wrote is dropped, billed as part
    of the check, and the step the policy rejects is written by a second call."""
    class WritesTooEarly(ScoredLines):
        stops_reading = False

        @staticmethod
        def rewrites_at(params, lps, counts):
            return 0 if params.rewrite_below else None  # always the first segment

    run, calls, _ = _run_verify(3, check_writes=True, executor=WritesTooEarly(SCRIPT))
    two, _, _ = _run_verify(3)
    assert run.chain == two.chain == "a = 1\nfixed 1\nc = 3\nd = 4\nfixed 4\nAnswer: 5"
    kept = [t for t in run.trace if not t.discarded]
    assert [t.stage for t in kept] == [t.stage for t in two.trace if not t.discarded]
    assert [side for side, _i, _p in calls.calls].count("write") == 2  # the real rewrites, second calls
    extra = 3 * 4 * 2.0 / 1e3  # each check wrote over its first step (0, 2, 5: kept) for nothing: 4 tokens
    assert run.cost == pytest.approx(two.cost + extra)
    # Those tokens are in the run's token counts too, on the checks that wrote them.
    assert [t.check_completion_tokens for t in run.trace if t.check_steps] == [4, 4, 4]
    assert run.to_dict()["completion_tokens"] == two.to_dict()["completion_tokens"] + 12
    assert run.to_dict()["cloud_tokens"] == two.to_dict()["cloud_tokens"] + 12
    assert run.cost == pytest.approx(sum(t.cost + t.speculative_cost + t.check_cost for t in run.trace))


def test_steps_an_engine_stopped_before_are_checked_by_a_call_of_their_own_when_the_policy_keeps_its_step():
    """An engine that writes stops reading at the step it rejects. When the policy keeps that step
    (an engine whose rule differs), the held steps after it were never scored: a check of their
    own scores them, and the decisions and chain are those of the two-call checks."""
    class WritesTooEarly(ScoredLines):
        @staticmethod
        def rewrites_at(params, lps, counts):
            return 0 if params.rewrite_below else None  # always the first segment, and stops reading there

    run, calls, router = _run_verify(3, check_writes=True, executor=WritesTooEarly(SCRIPT))
    two, _, _ = _run_verify(3)
    assert run.chain == two.chain == "a = 1\nfixed 1\nc = 3\nd = 4\nfixed 4\nAnswer: 5"
    kept = [t for t in run.trace if not t.discarded]
    assert [(t.stage, t.output) for t in kept] == [(t.stage, t.output) for t in two.trace if not t.discarded]
    # Steps 0-2 checked; the engine read only step 0, which the policy keeps: 1-2 are checked anew,
    # and there the engine's write of step 1 is the policy's rewrite.
    checks = [(i, len(p.candidate_splits)) for side, i, p in calls.calls if side == "check"]
    assert checks[:2] == [(0, 2), (1, 1)]
    # Each check counts the steps it read: one each here (the engine stopped at the first).
    assert [t.check_steps for t in run.trace if t.check_steps] == [1] * len(checks)
    assert kept[1].stage == "llm-rewrite" and kept[1].prompt_tokens == 0  # written in the second check's call
    assert run.cost == pytest.approx(sum(t.cost + t.speculative_cost + t.check_cost for t in run.trace))
    assert router.outstanding["e0"] == 0
