"""The step format on the real pair (llama.cpp with the bundled Qwen2.5-Coder GGUFs): an agent
step is one step of the model's own chain of thought, so ``all-llm`` through the agent writes
what one turn writes, and a chain that switches models step by step re-reads only its newest
steps (cached prompt tokens grow, uncached ones stay small) and is priced by the three prices."""

from __future__ import annotations

import asyncio
import difflib

import pytest

from agent_helpers import Alternate, EngineExecutor, RouterScheduler
from edge_node.worker import EdgeWorker
from hera_ray.agent import Agent, one_turn_messages, read_answer
from hera_ray.config import AgentConfig
from hera_ray.generation import GenerationParams
from hera_ray.models import resolve_model
from hera_ray.policy import build_policies
from hera_ray.pricing import DEFAULT_CLOUD_PRICES, PriceSheet, TokenCounts, cost
from hera_ray.scheduler.nodes import NodeSpec, NodeTable
from hera_ray.scheduler.router import Router

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTIONS = (
    "A baker makes 12 loaves a day for 5 days and sells 45 of them. How many loaves are left?",
    "Tom has 3 boxes of 8 pencils. He gives away 10 pencils. How many pencils does he have now?",
)
CHAIN_TOKENS = 320
EDGE_PRICES = PriceSheet(input_per_mtok=0.02, cached_input_per_mtok=0.01, output_per_mtok=0.05)


@pytest.fixture(scope="module")
def llm():
    worker = EdgeWorker(resolve_model("qwen2.5-coder-1.5b").path, "qwen2.5-coder-1.5b", n_ctx=2048, threads=2)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def slm():
    worker = EdgeWorker(resolve_model("qwen2.5-coder-0.5b").path, "qwen2.5-coder-0.5b", n_ctx=2048, threads=2)
    yield worker
    worker.close()


def make_agent(slm, llm, extra_policies=()):
    table = NodeTable()
    table.register(NodeSpec("edge-0", "edge-0:1", "qwen2.5-coder-0.5b", 2048, 1, prices=EDGE_PRICES), "t")
    policies = {**build_policies(), **{p.name: p for p in extra_policies}}
    router = Router(table, policies, "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", DEFAULT_CLOUD_PRICES)
    executor = EngineExecutor({"edge-0:1": slm}, llm)
    config = AgentConfig(max_steps=100, max_steps_limit=100, max_chain_tokens=CHAIN_TOKENS)
    return Agent(RouterScheduler(router), executor, config), executor


def cold(worker):
    """Empty the engine's KV cache, so that a run prefills its prompt as one batch from scratch.

    llama.cpp's kernels for a batch and for one token round differently; a prefix left in the cache
    by another run would change the last bits of some logits and can flip a near-tie in greedy
    decoding. Both runs compared here start cold, so any difference comes from the step format.
    """
    for slot in worker.slots:
        slot.llm.reset()
    return worker


def one_turn(worker, question):
    cold(worker)
    params = GenerationParams(messages=one_turn_messages(question), max_tokens=CHAIN_TOKENS, temperature=0.0)
    return asyncio.run(worker.generate(params)).text


@pytest.mark.parametrize("question", QUESTIONS)
def test_all_llm_through_the_agent_writes_what_one_turn_writes(llm, slm, question):
    agent, executor = make_agent(slm, llm)
    cold(llm)
    run = asyncio.run(agent.run(question, "all-llm"))
    turn = one_turn(llm, question)
    assert len(run.trace) > 1, "the chain was not cut into steps"
    assert all(t.placement == "cloud" and t.step_format == "continue" for t in run.trace)
    # Step i+1 continues the message step i left open: its prompt is the one-turn prompt plus the steps so far.
    assert executor.calls[0][1].messages == one_turn_messages(question)  # step 0 is asked as one turn is
    for i, (_side, params) in enumerate(executor.calls[1:], 1):  # then each step continues the open message
        assert params.continue_final_message and params.messages[:2] == one_turn_messages(question)
        assert params.messages[2] == ("assistant", "".join(t.output + t.boundary for t in run.trace[:i]))
    assert run.answer == read_answer(turn)[0], f"agent answered {run.answer!r}, one turn {read_answer(turn)[0]!r}"
    # The same text: each step is re-tokenised into the next prompt, and here that changed nothing.
    diff = "\n".join(difflib.unified_diff(turn.splitlines(), run.chain.splitlines(), "one turn", "agent", lineterm=""))
    assert run.chain == turn, f"the agent's chain differs from one turn:\n{diff}"


def test_alternating_models_reread_only_the_newest_steps_and_pay_the_three_prices(llm, slm):
    agent, _ = make_agent(slm, llm, [Alternate()])
    run = asyncio.run(agent.run(QUESTIONS[0], "alternate"))
    trace = run.trace
    assert len(trace) >= 4, f"only {len(trace)} steps: {[t.output for t in trace]}"
    assert [t.placement for t in trace[:4]] == ["edge", "cloud", "edge", "cloud"]
    for side in ("edge", "cloud"):
        mine = [t for t in trace if t.placement == side]
        assert mine[0].cached_prompt_tokens == 0 and mine[0].uncached_prompt_tokens == mine[0].prompt_tokens
        for before, now in zip(mine, mine[1:]):
            # What this side read last time is cached; only the steps written since are new input.
            assert now.cached_prompt_tokens == before.prompt_tokens > 0
            written_since = sum(t.completion_tokens for t in trace[before.index:now.index]) + 2 * (now.index - before.index)
            assert 0 < now.uncached_prompt_tokens <= written_since, (side, before.index, now.index)
        cached = [t.cached_prompt_tokens for t in mine[1:]]
        assert cached == sorted(cached) and len(set(cached)) == len(cached), f"cached tokens did not grow: {cached}"
    for t in trace:
        prices = EDGE_PRICES if t.placement == "edge" else DEFAULT_CLOUD_PRICES
        assert t.prompt_tokens == t.cached_prompt_tokens + t.uncached_prompt_tokens
        want = cost(TokenCounts(t.uncached_prompt_tokens, t.cached_prompt_tokens, t.completion_tokens), prices)
        assert t.cost == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert run.cost == pytest.approx(sum(t.cost for t in trace))


def test_hera_verify_checks_slm_steps_on_the_llm_and_rewrites_and_costs_the_rejected_ones(llm, slm):
    """Every SLM step goes to the LLM's check (keep 1.0, no confidence shortcut); a strict bar
    makes the LLM reject some. A kept step costs its edge call and the check; a rejected one also
    the LLM's rewrite, whose prompt the check left in the cache."""
    from hera_ray.policy.verify import KEPT_BY_LLM, REWRITTEN, VerifyConfig, VerifyPolicy

    policy = VerifyPolicy(VerifyConfig(keep=1.0, confidence_keep=1.01, llm_accept=0.9, check_writes=False))
    agent, executor = make_agent(slm, llm, [policy])
    run = asyncio.run(agent.run(QUESTIONS[1], "hera-verify"))
    stages = [t.stage for t in run.trace]
    assert set(stages) <= {KEPT_BY_LLM, REWRITTEN} and KEPT_BY_LLM in stages and REWRITTEN in stages, stages
    for t in run.trace:
        assert {"slm_confidence", "p_good", "llm_score", "llm_accept"} <= set(t.scores)
        assert t.check_prompt_tokens > 0 and t.check_cost > 0 and not t.check_error
        assert t.check_cost == pytest.approx(cost(TokenCounts(t.check_prompt_tokens - t.check_cached_prompt_tokens,
                                                              t.check_cached_prompt_tokens, 0), DEFAULT_CLOUD_PRICES))
        if t.stage == KEPT_BY_LLM:
            assert t.placement == "edge" and t.scores["llm_score"] >= 0.9 and not t.rejected_output
            assert t.cost == pytest.approx(cost(TokenCounts(t.uncached_prompt_tokens, t.cached_prompt_tokens,
                                                            t.completion_tokens), EDGE_PRICES))
        else:
            assert t.placement == "cloud" and t.scores["llm_score"] < 0.9
            assert t.rejected_output and t.speculative_cost > 0 and t.speculative_s > 0
            # The check put the prompt in the LLM's cache: the rewrite pays only for its output.
            assert t.cached_prompt_tokens == t.prompt_tokens and t.uncached_prompt_tokens == 0
            assert t.cost == pytest.approx(cost(TokenCounts(0, t.prompt_tokens, t.completion_tokens), DEFAULT_CLOUD_PRICES))
    # The chain holds the kept SLM steps and the LLM's rewrites, not the rejected steps.
    assert run.chain == "".join(t.output + t.boundary for t in run.trace)
    assert run.cost == pytest.approx(sum(t.cost + t.speculative_cost + t.check_cost for t in run.trace))
    checks = [p for side, p in executor.calls if side == "cloud" and p.candidate]
    assert len(checks) == len(run.trace) and all(p.max_tokens == 0 for p in checks)


def test_batched_checks_on_the_real_pair_keep_the_decisions_in_fewer_prefills(llm, slm):
    """verify.check_batch 3: the SLM writes on while up to three steps wait for the LLM's check, and
    one prefill scores them all. Every kept step is decided as a check of it alone decides it (the
    same chain as check_batch 1), with fewer prefills; a step written after a rejected one is
    discarded, and every call is billed."""
    from hera_ray.policy.verify import REWRITTEN, VerifyConfig, VerifyPolicy

    runs = {}
    for batch in (1, 3):
        policy = VerifyPolicy(VerifyConfig(keep=1.0, confidence_keep=1.01, llm_accept=0.9, check_batch=batch,
                                           check_writes=False))
        agent, executor = make_agent(cold(slm), cold(llm), [policy])
        runs[batch] = asyncio.run(agent.run(QUESTIONS[1], "hera-verify")), executor
    (one, one_exec), (three, three_exec) = runs[1], runs[3]
    kept = [t for t in three.trace if not t.discarded]
    scores = [(round(a.scores.get("llm_score", -1), 3), round(b.scores.get("llm_score", -1), 3))
              for a, b in zip(one.trace, kept)]
    assert three.chain == one.chain, scores
    assert [(t.stage, t.placement) for t in kept] == [(t.stage, t.placement) for t in one.trace], scores
    # The first step of each batch is scored exactly as alone; the later ones in one longer prefill.
    for a, b in zip(one.trace, kept):
        assert b.scores["llm_score"] == pytest.approx(a.scores["llm_score"], abs=0.05)
    checks = [p for side, p in three_exec.calls if side == "cloud" and p.candidate]
    one_checks = [p for side, p in one_exec.calls if side == "cloud" and p.candidate]
    assert len(one_checks) == len(one.trace) > len(checks)
    assert max(len(p.candidate_splits) for p in checks) == 2  # three steps in one prefill
    # Written after a rejected step in its batch: discarded, the chain went on from the rewrite.
    for i, t in enumerate(three.trace):
        if t.discarded:
            assert any(u.stage == REWRITTEN and not u.discarded for u in three.trace[:i])
    assert sum(t.check_steps for t in three.trace) >= len(kept)  # every kept step was scored (some twice)
    assert three.cost == pytest.approx(sum(t.cost + t.speculative_cost + t.check_cost for t in three.trace))
    checks_cost = lambda run: sum(t.check_cost for t in run.trace)  # noqa: E731
    assert checks_cost(three) < checks_cost(one)


@pytest.mark.parametrize("check_batch", [1, 3])
def test_a_check_that_writes_on_the_real_pair_keeps_the_decisions_and_reads_the_prompt_once(llm, slm, check_batch):
    """verify.check_writes: llama.cpp scores the steps and, at the first it rejects, writes the
    replacement over the same KV cache, in the check's own call. The same decisions and chain as a
    check followed by a rewrite call; no rewrite call; the rewritten steps billed for their output
    only, so the run costs less."""
    from hera_ray.policy.verify import REWRITTEN, VerifyConfig, VerifyPolicy

    runs = {}
    for writes in (False, True):
        policy = VerifyPolicy(VerifyConfig(keep=1.0, confidence_keep=1.01, llm_accept=0.9, check_batch=check_batch,
                                           check_writes=writes))
        agent, executor = make_agent(cold(slm), cold(llm), [policy])
        runs[writes] = asyncio.run(agent.run(QUESTIONS[1], "hera-verify")), executor
    (two, two_exec), (one, one_exec) = runs[False], runs[True]
    kept = [t for t in one.trace if not t.discarded]
    want = [t for t in two.trace if not t.discarded]
    assert [(t.stage, t.placement) for t in kept] == [(t.stage, t.placement) for t in want]
    assert one.chain == two.chain
    rewrites = [t for t in kept if t.stage == REWRITTEN]
    assert rewrites, "the strict bar should make the LLM reject a step"
    writes = [p for side, p in one_exec.calls if side == "cloud" and not p.candidate]
    assert not writes and [p for side, p in two_exec.calls if side == "cloud" and not p.candidate]
    for t in rewrites:
        assert t.prompt_tokens == 0 and t.completion_tokens > 0 and t.output
        assert t.cost == pytest.approx(cost(TokenCounts(0, 0, t.completion_tokens), DEFAULT_CLOUD_PRICES))
    assert one.cost == pytest.approx(sum(t.cost + t.speculative_cost + t.check_cost for t in one.trace))
    assert one.cost < two.cost
