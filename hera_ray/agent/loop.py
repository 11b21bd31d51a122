"""The agent loop: a request answered as a chain of steps, each placed by the scheduler.

A step is one line of the model's own chain of thought (the format is in
:mod:`hera_ray.agent.steps`): the steps so far are one open assistant message, and the model
chosen for the next step continues it until the end of a line, its token cap or the end of its
message. The loop asks the scheduler where each step runs, runs it there, records a trace entry
(tokens split into uncached prompt, cached prompt and completion, and the step's cost), and stops
when the model ends its message, the chain reaches its token cap, or the step limit is hit. The
answer is read from the whole chain.

Pure asyncio over two small interfaces (a scheduler and an executor), so it is tested without
Ray; the Serve ingress plugs in the SubtaskScheduler actor and real edge/cloud executors.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Awaitable, Callable, Protocol

from hera_ray.agent.steps import (Step, StepFormat, chain_answer, chain_text, checked_text, continues, make_step,
                                  step_messages)
from hera_ray.config import AgentConfig
from hera_ray.errors import ContextLengthExceeded, HeraError, InvalidRequest, Overloaded, Unavailable
from hera_ray.generation import GenerationParams, GenerationResult
from hera_ray.policy.base import SPECULATE
from hera_ray.policy.verify import VERIFY


@dataclass
class TraceEntry:
    index: int
    #: The step's text, stripped (what the HERA estimators see as the subtask).
    subtask: str
    #: The step's text as the chain holds it (with its line end).
    output: str
    placement: str
    node: str
    model: str
    stage: str
    scores: dict[str, float]
    fallback: str
    #: Prompt tokens in all (``cached_prompt_tokens + uncached_prompt_tokens``).
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    cost: float
    latency_s: float
    #: Time the agent waited for placement decisions for this step: the policy, its estimator calls,
    #: and the round trips to the scheduler (one per decision; hera-verify makes up to three).
    decision_s: float
    generation_s: float  # the executor call, as the agent saw it (includes the transport)
    model_s: float = 0.0  # the model's own time: time to first token + decode, as the engine measured it
    retries: int = 0
    finish_reason: str = ""
    #: Time spent on an SLM step the policy then sent to the LLM (speculative SSE only), and what
    #: that step cost on its edge node (``cost`` is then the step that was kept, alone).
    speculative_s: float = 0.0
    speculative_cost: float = 0.0
    #: Attempts of this subtask that failed before it ran ("<node>: <error>"), oldest first: a node
    #: that died, froze past the subtask timeout or was full, or a cloud replica that died.
    failures: list[str] = field(default_factory=list)
    #: The part of the prompt that extends this side's previous call of the request (a provider's
    #: prefix cache hit: priced as cached input), and the rest (priced as input).
    cached_prompt_tokens: int = 0
    uncached_prompt_tokens: int = 0
    #: What the chain adds after ``output``: "" (the step holds its own line end, was cut by its
    #: token cap, or ended the message), or "\n" (a backend that stopped on the string dropped it).
    boundary: str = ""
    #: How the step was asked for: "continue" (the open assistant message) or "turns" (fallback).
    step_format: str = StepFormat.CONTINUE.value
    #: The LLM's check of the SLM's step (a ``verify`` decision): one prefill of the step over the
    #: LLM's cached prefix, billed as input. Its prompt tokens (cached and not), cost and time;
    #: ``check_error`` if the cloud backend could not score (the LLM then rewrote the step).
    check_prompt_tokens: int = 0
    check_cached_prompt_tokens: int = 0
    check_cost: float = 0.0
    check_s: float = 0.0
    check_error: str = ""
    #: What the check's own call wrote that no step kept (``verify.check_writes``: the engine wrote
    #: in place of a step the policy then kept, or a later step's smaller token cap cut the write
    #: short): output tokens, billed in ``check_cost``.
    check_completion_tokens: int = 0
    #: Steps that check scored in its one prefill: 1, this step alone; more, a batched check
    #: (``verify.check_batch``), billed here, on the first of them; 0 on the others it scored (their
    #: ``scores`` hold their own ``llm_score``) and on a step no check read.
    check_steps: int = 0
    #: The SLM's step the policy discarded (the LLM wrote this one instead), if any.
    rejected_output: str = ""
    #: The SLM's token log-probabilities of the step it wrote first, when the policy judged that step
    #: (hera-verify, speculative HERA): kept or rejected, what ``hera learn`` trains the step classifier on.
    slm_logprobs: list[float] = field(default_factory=list)
    #: Engine calls this step made (the step, a discarded SLM step, a check), and how many of them an
    #: engine answered from its generation cache (an evaluation setting: hera_ray/gencache.py).
    engine_calls: int = 0
    cache_hits: int = 0
    #: This step's text is not in the final chain (its cost still counts): a cascade escalated after
    #: it (the LLM answered the request again from the start), or a batched check rejected an earlier
    #: step that this one was written after (the LLM rewrote that step; the chain went on from there).
    discarded: bool = False


@dataclass
class AgentRun:
    request_id: str
    policy: str
    question: str
    answer: str
    finished: bool  # the model ended its message or wrote an answer line (else a limit ended the run)
    #: Everything from the answer line on (several lines: a code block); ``answer`` is its first line.
    final_text: str = ""
    trace: list[TraceEntry] = field(default_factory=list)
    latency_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)
    #: A cascade's review of the finished chain: its ``stage`` (``cascade-accept`` or
    #: ``cascade-escalate``), ``scores`` and ``decision_s``; empty for other policies.
    review: dict[str, Any] = field(default_factory=dict)

    @property
    def slm_share(self) -> float:
        """Share of the kept steps that ran on the SLM (a cascade's discarded chain is left out, as a
        rejected speculative step is; its cost still counts)."""
        kept = [t for t in self.trace if not t.discarded]
        return sum(t.placement == "edge" for t in kept) / len(kept) if kept else 0.0

    @property
    def cost(self) -> float:
        return sum(t.cost + t.speculative_cost + t.check_cost for t in self.trace)

    @property
    def chain(self) -> str:
        """The whole chain of thought: every step with its boundary, as one message (a chain a cascade
        discarded left out)."""
        return "".join(t.output + t.boundary for t in self.trace if not t.discarded)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # LLM checks (hera-verify) read tokens on the cloud too: counted here as prompt tokens.
        d.update(slm_share=self.slm_share, cost=self.cost, chain=self.chain,
                 cloud_tokens=sum(t.tokens for t in self.trace if t.placement == "cloud")
                 + sum(t.check_prompt_tokens + t.check_completion_tokens for t in self.trace),
                 prompt_tokens=sum(t.prompt_tokens + t.check_prompt_tokens for t in self.trace),
                 cached_prompt_tokens=sum(t.cached_prompt_tokens + t.check_cached_prompt_tokens for t in self.trace),
                 completion_tokens=sum(t.completion_tokens + t.check_completion_tokens for t in self.trace))
        return d


class Scheduler(Protocol):
    async def route(self, request: dict[str, Any], max_cloud_cost: float | None = None) -> dict[str, Any]: ...
    async def report(self, report: dict[str, Any]) -> float: ...
    async def finish(self, request_id: str) -> dict[str, Any]: ...


class Executor(Protocol):
    async def edge(self, address: str, params: GenerationParams) -> GenerationResult: ...
    async def cloud(self, params: GenerationParams) -> GenerationResult: ...


@dataclass
class _LastCall:
    """One side's previous call in this request: what a prefix cache holds of it."""

    chain: str
    prompt_tokens: int


@dataclass
class _Check:
    """The LLM's check of one SLM step, as the trace entry reports it."""

    prompt_tokens: int = 0
    cached: int = 0
    cost: float = 0.0
    seconds: float = 0.0
    error: str = ""
    steps: int = 0
    completion_tokens: int = 0  # written for nothing (see TraceEntry.check_completion_tokens)
    #: The check's own call wrote the step in place of the SLM's (``rewrite_below``).
    written: GenerationResult | None = None


@dataclass
class _Held:
    """A borderline SLM step kept for now: its LLM check waits for a batch (``check_batch``)."""

    entry: TraceEntry
    #: Its place in the chain (``state.steps``).
    position: int
    #: The request as the policy judged it with the SLM's step, and its ``verify`` decision.
    spec: dict[str, Any]
    route: dict[str, Any]
    max_tokens: int


@dataclass
class _RunState:
    run: AgentRun
    #: Tokens the chain may hold (agent.max_chain_tokens, or a request's lower max_tokens).
    chain_cap: int = 0
    #: Step mode: the caller's own call (its conversation, tools and settings), run as it stands,
    #: and the conversation before it as the policy sees it (PastStep dicts).
    call: GenerationParams | None = None
    history: list[dict[str, Any]] | None = None
    session: str | None = None
    steps: list[Step] = field(default_factory=list)
    chain_tokens: int = 0
    #: Per side ("cloud", or an edge node id): the previous call, for the cached-prompt count.
    last_call: dict[str, _LastCall] = field(default_factory=dict)
    #: Engine calls made for this request, and how many an engine answered from its generation cache.
    engine_calls: int = 0
    cache_hits: int = 0
    #: The policy asked to review the finished chain; the chain's generated tokens' log-probabilities.
    review: bool = False
    chain_logprobs: list[float] = field(default_factory=list)
    #: A review escalated the request: the LLM's answer is under way (its steps' request ids say so).
    escalated: bool = False
    #: Borderline steps whose LLM check waits for a batch, oldest first; the steps written since are
    #: not sent to ``on_step`` until the check has decided them (a rejection discards them).
    held: list[_Held] = field(default_factory=list)
    unsent: list[TraceEntry] = field(default_factory=list)


class Agent:
    """Runs one request as a chain of steps (or, in step mode, one call of the caller's agent).

    ``cloud_step_format``: how the cloud backend is asked for the next step; CONTINUE for llama.cpp
    and vLLM, TURNS for an OpenAI-compatible endpoint that cannot continue a message. Edge nodes
    (llama.cpp) always continue.
    """

    #: Step-mode sessions whose previous calls are remembered for prompt caching.
    MAX_SESSIONS = 10_000

    def __init__(self, scheduler: Scheduler, executor: Executor, config: AgentConfig | None = None,
                 cloud_step_format: StepFormat = StepFormat.CONTINUE):
        self.scheduler = scheduler
        self.executor = executor
        self.config = config or AgentConfig()
        self.cloud_step_format = StepFormat(cloud_step_format)
        #: Step mode: per session, each side's previous call (for the cached-prompt count); the oldest forgotten.
        self._session_calls: OrderedDict[str, dict[str, _LastCall]] = OrderedDict()

    async def run(
        self,
        question: str,
        policy: str,
        request_id: str | None = None,
        max_steps: int | None = None,
        max_cloud_cost: float | None = None,
        on_step: Callable[[TraceEntry], Awaitable[None] | None] | None = None,
        max_chain_tokens: int | None = None,
    ) -> AgentRun:
        request_id = request_id or uuid.uuid4().hex
        steps = max_steps or self.config.max_steps
        run = AgentRun(request_id=request_id, policy=policy, question=question, answer="", finished=False)
        state = _RunState(run, chain_cap=max_chain_tokens or self.config.max_chain_tokens)
        t_run = time.perf_counter()
        try:
            await self._chain(state, steps, max_cloud_cost, on_step)
            if state.review and await self._review(state, max_cloud_cost):
                # Escalated: the LLM answers again from the start; the SLM's chain stays in the trace.
                for t in run.trace:
                    t.discarded = True
                state.steps, state.chain_tokens, state.review, state.chain_logprobs = [], 0, False, []
                state.escalated = True
                await self._chain(state, steps, max_cloud_cost, on_step)
            answer, final_text, found = chain_answer(chain_text(state.steps))
            run.finished = found or bool(state.steps and state.steps[-1].end)
            run.answer, run.final_text = answer, final_text
        finally:
            run.usage = await self.scheduler.finish(request_id)
            run.latency_s = time.perf_counter() - t_run
        return run

    async def call(self, call: GenerationParams, policy: str, session_id: str, position: int, question: str,
                   history: list[dict[str, Any]], max_cloud_cost: float | None = None) -> TraceEntry:
        """Step mode: one call of the caller's own agent is one subtask. The policy places it (with the
        session's id as the request, ``position`` as the subtask's index, the conversation before it
        as the history) and the chosen model answers ``call`` as it stands: its conversation, tools
        and settings. Every stage works as in a chain (hera-verify speculates, checks and rewrites).
        Returns the trace entry; its ``output`` is the reply. The session stays open in the ledger."""
        # The ledger bills each call on its own (its cap is the call's); the policy and node affinity see the session.
        call_id = f"{session_id}#{position}-{uuid.uuid4().hex[:8]}"
        run = AgentRun(request_id=call_id, policy=policy, question=question, answer="", finished=False)
        # The session's previous call on each side: what a provider's prefix cache holds of this call's prompt.
        last_call = self._session_calls.pop(session_id, {})
        state = _RunState(run, chain_cap=call.max_tokens, call=call, history=history, session=session_id,
                          last_call=last_call)
        try:
            entry, _step = await self._step(state, position, call.max_tokens, max_cloud_cost)
        finally:
            run.usage = await self.scheduler.finish(call_id)
            self._session_calls[session_id] = state.last_call
            while len(self._session_calls) > self.MAX_SESSIONS:
                self._session_calls.popitem(last=False)
        return entry

    async def _chain(self, state: _RunState, steps: int, max_cloud_cost: float | None,
                     on_step: Callable[[TraceEntry], Awaitable[None] | None] | None) -> None:
        """Write the chain step by step until the model ends it or a cap does."""
        run = state.run
        while len(state.steps) < steps:
            budget = state.chain_cap - state.chain_tokens
            if budget <= 0:
                break
            out = await self._step(state, len(state.steps), min(budget, self.config.max_tokens_per_step), max_cloud_cost)
            if out is None:  # held checks ran first and rewrote a step: the chain goes on from there
                await self._emit(state, on_step)
                if self._ended(state):
                    break
                continue
            entry, step = out
            run.trace.append(entry)
            state.steps.append(step)
            state.chain_tokens += entry.completion_tokens
            state.unsent.append(entry)
            ended = self._ended(state)
            if state.held and (ended or len(state.held) >= state.held[-1].route.get("check_batch", 1)
                               or len(state.steps) >= steps or state.chain_tokens >= state.chain_cap):
                if await self._flush(state, max_cloud_cost):
                    ended = self._ended(state)
            if not state.held:
                await self._emit(state, on_step)
            if ended:
                break  # the model ended its message (or wrote nothing more: asking again would loop)

    @staticmethod
    def _ended(state: _RunState) -> bool:
        """The chain's last step ends it (the model ended its message, or wrote nothing)."""
        if not state.steps:
            return False
        last = state.steps[-1]
        entry = next(t for t in reversed(state.run.trace) if not t.discarded)
        return last.end or (entry.completion_tokens == 0 and not last.text)

    @staticmethod
    async def _emit(state: _RunState, on_step: Callable[[TraceEntry], Awaitable[None] | None] | None) -> None:
        """Send the steps decided so far to ``on_step``, in order (a discarded one is not sent)."""
        unsent, state.unsent = state.unsent, []
        if on_step is None:
            return
        for entry in unsent:
            if entry.discarded:
                continue
            maybe = on_step(entry)
            if maybe is not None:
                await maybe

    async def _review(self, state: _RunState, max_cloud_cost: float | None) -> bool:
        """Ask the policy about the finished chain (a cascade's check); True: answer again on the LLM."""
        run = state.run
        history = [{"subtask": t.subtask, "output": t.output, "placement": t.placement}
                   for t in run.trace if not t.discarded]
        route = await self._route({"request_id": run.request_id, "policy": run.policy, "index": len(state.steps),
                                   "question": run.question, "history": history, "exclude_nodes": [],
                                   "chain_logprobs": state.chain_logprobs}, max_cloud_cost)
        # The router picks no node for a review; past the request's cloud cap it keeps the answer (fallback "budget").
        escalated = route["placement"] == "cloud"
        run.review = {"stage": route["stage"], "scores": route["scores"], "decision_s": route["decision_s"],
                      "fallback": route["fallback"], "escalated": escalated}
        if run.trace:  # the review's time is deciding time, counted with the last step's
            run.trace[-1].decision_s += route["decision_s"]
        return escalated

    def _params(self, state: _RunState, index: int, max_tokens: int, fmt: StepFormat,
                logprobs: bool = False, candidate: str = "", splits: tuple[int, ...] = (),
                rewrite_below: tuple[float, ...] = ()) -> GenerationParams:
        """The call for step ``index`` (the chain before it is the prompt); with ``candidate``, the
        check that scores it (``splits``: a batched check's segments, one per step; ``rewrite_below``:
        the check writes in place of the first step under its bar, as the step's own call would)."""
        run = state.run
        scores_only = bool(candidate) and not rewrite_below
        if state.call is not None:  # step mode: the caller's call as it stands (a check scores after its prompt)
            return replace(state.call, max_tokens=0 if scores_only else max_tokens, stop_at_line_end=False,
                           request_id=f"{run.request_id}:{index}" + (":check" if candidate else ""),
                           logprobs=logprobs, candidate=candidate, rewrite_below=rewrite_below)
        chain = chain_text(state.steps[:index])
        return GenerationParams(
            messages=step_messages(run.question, chain, fmt),
            continue_final_message=continues(fmt, chain),
            max_tokens=0 if scores_only else max_tokens,
            temperature=self.config.temperature,
            stop_at_line_end=not scores_only,
            request_id=f"{run.request_id}:{index}" + (":escalated" if state.escalated else "") + (":check" if candidate else ""),
            logprobs=logprobs,
            candidate=candidate,
            candidate_splits=splits,
            rewrite_below=rewrite_below,
        )

    def _format(self, route: dict[str, Any]) -> StepFormat:
        return StepFormat.CONTINUE if route["placement"] == "edge" else self.cloud_step_format

    async def _step(self, state: _RunState, index: int, max_tokens: int,
                    max_cloud_cost: float | None) -> tuple[TraceEntry, Step] | None:
        """Decide, run (and, for hera-verify, check) step ``index``; its trace entry and step. None:
        the steps held for a batched check had to be decided first, and one was rewritten (the chain
        is shorter now: ask again for its next step)."""
        run = state.run
        history = state.history if state.history is not None else [
            {"subtask": t.subtask, "output": t.output, "placement": t.placement} for t in run.trace
            if not t.discarded]
        request = {"request_id": run.request_id, "policy": run.policy, "index": index, "question": run.question,
                   "history": history, "exclude_nodes": []}
        if state.session is not None:
            request["session"] = state.session
        if state.escalated:
            request["escalated"] = True
        t0 = time.perf_counter()
        decision_s = speculative_s = speculative_cost = 0.0
        failures: list[str] = []
        check = _Check()
        rejected = ""
        calls0, hits0 = state.engine_calls, state.cache_hits
        hold: dict[str, Any] | None = None
        while True:
            route = await self._route(request, max_cloud_cost)
            decision_s += route["decision_s"]
            fmt = self._format(route)
            speculate = route["stage"] == SPECULATE and route["placement"] == "edge"
            if state.held and not speculate and await self._flush(state, max_cloud_cost):
                # Held steps must be decided before another model writes after them; one was rewritten.
                if route["placement"] == "edge":
                    await self.scheduler.report({**_report_base(run, route), "ok": True, "release_only": True})
                return None
            params = self._params(state, index, max_tokens, fmt,
                                  logprobs=bool(route.get("logprobs")) and route["placement"] == "edge")
            t_gen = time.perf_counter()
            try:
                result, cost, cached = await self._execute(state, route, params, failures)
            except ContextLengthExceeded as e:
                # The prompt does not fit the edge's context window (a long conversation in step mode):
                # the cloud takes it, and the trace says why (fallback "context").
                if route["placement"] != "edge" or request.get("cloud_only"):
                    raise
                failures.append(f"{route['node_id']}: {e.message}")
                request["cloud_only"] = True
                continue
            except (Unavailable, Overloaded) as e:
                # The edge node died, froze past the subtask timeout, drains or is full: re-route this
                # subtask elsewhere (another node, or the cloud once none is left).
                if route["placement"] != "edge":
                    raise
                failures.append(f"{route['node_id']}: {e.message}")
                if len(request["exclude_nodes"]) >= self.config.edge_retries:
                    raise
                request["exclude_nodes"] = [*request["exclude_nodes"], route["node_id"]]
                continue
            generation_s = time.perf_counter() - t_gen
            step = make_step(result.text, result.finish_reason, result.stop_reason)
            scores = route["scores"]
            slm_logprobs: list[float] = []
            if speculate:
                slm_logprobs = list(result.logprobs or [])
                # The policy asked for the SLM's real step first: ask again with what it wrote.
                spec = {**request, "slm_candidate": step.text, "slm_logprobs": result.logprobs}
                final = await self._route(spec, max_cloud_cost)
                decision_s += final["decision_s"]
                scores = {**scores, **final["scores"]}
                if (final["stage"] == VERIFY and final["placement"] == "cloud" and state.call is None
                        and (final.get("check_batch", 1) > 1 or state.held)):
                    # Borderline, checked in a batch: kept for now, the SLM writes on (see _flush). A
                    # step that may not wait (check_batch 1) joins the steps waiting and closes the batch.
                    hold = final
                    final = {**final, "placement": "edge"}
                elif final["stage"] == VERIFY and final["placement"] == "cloud":
                    # Borderline: the LLM scores the step in one prefill, then the policy decides.
                    final = await self._check(state, index, max_tokens, step, spec, final, check, failures, max_cloud_cost)
                    decision_s += final["decision_s"]
                    scores = {**scores, **final["scores"]}
                if hold is not None:  # the verify route picked no node: nothing to release
                    route = {**final, "node_id": route["node_id"], "model": route["model"]}
                elif final["placement"] == "edge":  # accepted: the step already ran; release the second node pick
                    await self.scheduler.report({**_report_base(run, final), "ok": True, "release_only": True})
                    route = {**final, "node_id": route["node_id"], "model": route["model"]}
                else:  # rejected: the LLM writes this step, and the SLM's time was spent for nothing
                    speculative_s, speculative_cost = generation_s, cost
                    rejected = step.text
                    fmt = self._format(final)
                    result, cost, cached, generation_s = await self._llm_step(state, index, max_tokens, final, fmt,
                                                                              failures, check.written)
                    step = make_step(result.text, result.finish_reason, result.stop_reason)
                    route = final
            if route.get("review"):
                state.review = True
            state.chain_logprobs += result.logprobs or []
            entry = TraceEntry(
                index=index, subtask=step.text.strip(), output=step.text, placement=route["placement"],
                node=route["node_id"], model=route["model"], stage=route["stage"], scores=scores,
                fallback=route["fallback"], prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, tokens=result.prompt_tokens + result.completion_tokens,
                cost=cost, latency_s=time.perf_counter() - t0, decision_s=decision_s, generation_s=generation_s,
                model_s=result.ttft_s + result.decode_s, retries=len(failures), finish_reason=result.finish_reason,
                speculative_s=speculative_s, speculative_cost=speculative_cost, failures=failures, cached_prompt_tokens=cached,
                uncached_prompt_tokens=result.prompt_tokens - cached, boundary=step.boundary, step_format=fmt.value,
                check_prompt_tokens=check.prompt_tokens, check_cached_prompt_tokens=check.cached, check_cost=check.cost,
                check_s=check.seconds, check_error=check.error, check_steps=check.steps,
                check_completion_tokens=check.completion_tokens, rejected_output=rejected,
                slm_logprobs=slm_logprobs, engine_calls=state.engine_calls - calls0, cache_hits=state.cache_hits - hits0,
            )
            if hold is not None:
                state.held.append(_Held(entry, index, spec, hold, max_tokens))
            return entry, step

    async def _check(self, state: _RunState, index: int, max_tokens: int, step: Step, spec: dict[str, Any],
                     route: dict[str, Any], check: "_Check", failures: list[str],
                     max_cloud_cost: float | None) -> dict[str, Any]:
        """Score the SLM's ``step`` on the cloud LLM (``route``: the ``verify`` decision) and ask the
        policy again with the LLM's log-probabilities; returns that final decision. A backend that
        cannot score (an OpenAI endpoint) leaves the step to the LLM to rewrite."""
        fmt = self._format(route)
        candidate = checked_text(step.text + step.boundary)  # what the chain would hold, less trailing indentation
        bar = route.get("rewrite_below", 0.0)
        params = self._params(state, index, max_tokens, fmt, candidate=candidate, rewrite_below=(bar,) if bar else ())
        t0 = time.perf_counter()
        try:
            result, check.cost, check.cached = await self._execute(state, route, params, failures)
        except InvalidRequest as e:
            check.error, check.seconds = e.message, time.perf_counter() - t0
            return {**route, "stage": "llm-rewrite", "fallback": "no-check", "decision_s": 0.0, "scores": {}}
        check.seconds = time.perf_counter() - t0
        check.prompt_tokens, check.steps = result.prompt_tokens, 1
        verdict = await self._route({**spec, "llm_logprobs": result.logprobs or [],
                                     "llm_top_logprobs": result.top_logprobs or []}, max_cloud_cost)
        if result.rewritten_segment is not None:
            if verdict["placement"] != "edge":  # rejected, and already written in the check's call
                check.written = result
            else:  # the engine wrote where the policy kept the step: written for nothing, billed with the check
                check.cost += await self._bill_write(state, route, result, check=True)
                check.completion_tokens = result.completion_tokens
        return verdict

    async def _flush(self, state: _RunState, max_cloud_cost: float | None) -> bool:
        """Check the held steps: the LLM scores them in one prefill (each step a segment of the
        candidate), then the policy decides each in order, as a check of it alone would. The first
        it rejects the LLM rewrites, and the steps written after it are discarded. True when a step
        was rewritten (the chain changed after its last held step's position)."""
        held, state.held = state.held, []
        if not held:
            return False
        run = state.run
        first, last = held[0].position, held[-1].position
        texts = [s.text + s.boundary for s in state.steps[first:last + 1]]
        # Each step's segment ends where its checked text does (a step's trailing indentation opens
        # the next one's segment): held steps are never blank, so each segment has text.
        candidate, ends, offset = checked_text("".join(texts)), [], 0
        for text in texts:
            ends.append(offset + len(checked_text(text)))
            offset += len(text)
        ends[-1] = len(candidate)
        splits = tuple(sorted(set(e for e in ends[:-1] if 0 < e < len(candidate))))
        bounds = (0, *splits, len(candidate))
        segment = {h.position: bounds.index(ends[h.position - first]) - 1 for h in held}  # the segment that ends
        # where the held step's checked text does. The check may write in place of the first held step
        # under its bar (the steps between them, kept already, are not judged), up to the smallest of
        # their token caps (a later step's is smaller when the chain's cap is near).
        bars = [0.0] * (len(bounds) - 1)
        for h in held:
            bars[segment[h.position]] = h.route.get("rewrite_below", 0.0)
        owner = held[0].entry  # the check is billed on the first held step's entry
        route = held[0].route
        params = self._params(state, first, min(h.max_tokens for h in held), self._format(route), candidate=candidate,
                              splits=splits, rewrite_below=tuple(bars) if any(bars) else ())
        failures: list[str] = []
        t0 = time.perf_counter()
        calls0, hits0 = state.engine_calls, state.cache_hits
        try:
            result, owner.check_cost, owner.check_cached_prompt_tokens = await self._execute(state, route, params, failures)
        except InvalidRequest as e:  # the backend cannot score (an OpenAI endpoint): the LLM rewrites the first
            owner.check_error, owner.check_s = e.message, time.perf_counter() - t0
            owner.failures += failures
            h = held[0]
            verdict = {**h.route, "stage": "llm-rewrite", "fallback": "no-check", "decision_s": 0.0, "scores": {}}
            await self._rewrite(state, h, verdict)
            return True
        owner.check_s = time.perf_counter() - t0
        owner.check_prompt_tokens = result.prompt_tokens
        owner.failures += failures
        owner.latency_s += owner.check_s
        owner.engine_calls += state.engine_calls - calls0
        owner.cache_hits += state.cache_hits - hits0
        lps, tops = list(result.logprobs or []), list(result.top_logprobs or [])
        counts = (result.segment_tokens or []) if splits else [len(lps)]  # one segment: the engine sends no counts
        # An engine that wrote may have stopped reading at the segment it wrote in place of.
        read = (len(bounds) - 1,) if result.rewritten_segment is None else (len(bounds) - 1, result.rewritten_segment + 1)
        if len(counts) not in read or sum(counts) != len(lps):
            raise HeraError(f"the cloud backend scored {len(lps)} token(s) in "
                            f"{len(counts)} segment(s) where {len(bounds) - 1} were sent")
        owner.check_steps = sum(segment[h.position] < len(counts) for h in held)  # those it read
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        rejected: tuple[_Held, dict[str, Any]] | None = None
        unread: list[_Held] = []
        for i, h in enumerate(held):
            k = segment[h.position]
            if k >= len(counts):  # not read: the engine stopped at a step the policy then kept
                unread = held[i:]
                break
            a, b = starts[k], starts[k + 1]
            verdict = await self._route({**h.spec, "llm_logprobs": lps[a:b], "llm_top_logprobs": tops[a:b]},
                                        max_cloud_cost)
            h.entry.decision_s += verdict["decision_s"]
            h.entry.scores = {**h.entry.scores, **verdict["scores"]}
            h.entry.fallback = verdict["fallback"] or h.entry.fallback
            if verdict["placement"] == "edge":  # kept: release the node the decision picked
                h.entry.stage = verdict["stage"]
                await self.scheduler.report({**_report_base(run, verdict), "ok": True, "release_only": True})
                continue
            rejected = (h, verdict)
            break
        written = None
        if result.rewritten_segment is not None:
            # A write the batch's cap cut (a later step's, smaller than this step's own) is written
            # again with the step's cap; one the context window cut is what the step's call would write.
            capped = (result.finish_reason == "length" and result.completion_tokens >= params.max_tokens
                      and rejected is not None and params.max_tokens < rejected[0].max_tokens)
            if rejected is not None and segment[rejected[0].position] == result.rewritten_segment and not capped:
                written = result
            else:  # the engine wrote where the policy kept the step (or cut short): billed with the check
                owner.check_cost += await self._bill_write(state, route, result, check=True)
                owner.check_completion_tokens += result.completion_tokens
        if rejected is None:
            if unread:  # checked by a call of their own
                state.held = unread
                return await self._flush(state, max_cloud_cost)
            return False
        await self._rewrite(state, *rejected, written=written, after_checked=segment[rejected[0].position] > 0)
        return True

    async def _rewrite(self, state: _RunState, h: _Held, verdict: dict[str, Any],
                       written: GenerationResult | None = None, after_checked: bool = False) -> None:
        """The LLM writes held step ``h`` anew (``verdict``: the policy's rewrite decision), or the
        check's own call has (``written``; ``after_checked``: after another step it checked); the
        steps written after it leave the chain (their trace entries are marked discarded)."""
        run = state.run
        after = False
        for t in run.trace:
            after = after or t is h.entry
            if after and t is not h.entry:
                t.discarded = True
        del state.steps[h.position:]
        fmt = self._format(verdict)
        failures: list[str] = []
        calls0, hits0 = state.engine_calls, state.cache_hits
        if written is not None:
            # The check wrote after the checked text of the step before (less the next line's
            # indentation it carried, which the new step writes itself): that step now ends there.
            if after_checked:
                prev = state.steps[h.position - 1]
                kept = checked_text(prev.text + prev.boundary)
                if kept != prev.text + prev.boundary:
                    state.steps[h.position - 1] = replace(prev, text=kept, boundary="")
                    entry = [t for t in run.trace if not t.discarded][h.position - 1]
                    entry.output, entry.subtask = kept, kept.strip()
        result, cost, cached, generation_s = await self._llm_step(state, h.position, h.max_tokens, verdict, fmt,
                                                                  failures, written)
        step = make_step(result.text, result.finish_reason, result.stop_reason)
        e = h.entry
        e.speculative_s, e.speculative_cost, e.rejected_output = e.generation_s, e.cost, e.output
        e.subtask, e.output, e.boundary = step.text.strip(), step.text, step.boundary
        e.placement, e.node, e.model, e.stage = verdict["placement"], verdict["node_id"], verdict["model"], verdict["stage"]
        e.fallback = verdict["fallback"]
        prompt = result.prompt_tokens
        e.prompt_tokens, e.completion_tokens = prompt, result.completion_tokens
        e.tokens, e.cost = prompt + result.completion_tokens, cost
        e.cached_prompt_tokens, e.uncached_prompt_tokens = cached, prompt - cached
        e.generation_s, e.model_s, e.finish_reason = generation_s, result.ttft_s + result.decode_s, result.finish_reason
        e.step_format, e.failures, e.retries = fmt.value, [*e.failures, *failures], e.retries + len(failures)
        e.latency_s += generation_s
        e.engine_calls += state.engine_calls - calls0
        e.cache_hits += state.cache_hits - hits0
        state.steps.append(step)
        state.chain_tokens = sum(t.completion_tokens for t in run.trace if not t.discarded)

    async def _llm_step(self, state: _RunState, index: int, max_tokens: int, verdict: dict[str, Any], fmt: StepFormat,
                        failures: list[str], written: GenerationResult | None = None
                        ) -> tuple[GenerationResult, float, int, float]:
        """The LLM's step ``index`` in place of the SLM's it rejected (``verdict``): what the check's
        own call wrote (``written``; its prompt was billed with the check, so 0 here), or a call of its
        own. (result, cost, cached prompt tokens, generation seconds)."""
        if written is not None:
            cost = await self._bill_write(state, verdict, written)
            return replace(written, prompt_tokens=0, logprobs=None, top_logprobs=None), cost, 0, 0.0
        params = self._params(state, index, max_tokens, fmt)
        t_gen = time.perf_counter()
        result, cost, cached = await self._execute(state, verdict, params, failures)
        return result, cost, cached, time.perf_counter() - t_gen

    async def _route(self, request: dict[str, Any], max_cloud_cost: float | None) -> dict[str, Any]:
        """Ask the scheduler; the route's ``decision_s`` is the whole call as the agent waited for it
        (the policy, its estimator calls, and the round trip to the scheduler actor)."""
        t0 = time.perf_counter()
        route = await self.scheduler.route(request, max_cloud_cost)
        return {**route, "policy_s": route.get("decision_s", 0.0), "decision_s": time.perf_counter() - t0}

    async def _execute(self, state: _RunState, route: dict[str, Any], params: GenerationParams,
                       failures: list[str]) -> tuple[GenerationResult, float, int]:
        """Run the step where ``route`` says and report it to the scheduler; (result, cost, cached
        prompt tokens). A cloud step whose replica died or was full is tried again after a backoff
        (Serve replaces a dead replica); each failed try is added to ``failures``. An edge failure
        is raised for re-routing."""
        for attempt in range(self.config.cloud_retries + 1):
            try:
                return await self._execute_once(state, route, params)
            except (Unavailable, Overloaded) as e:
                if route["placement"] == "edge":
                    raise
                failures.append(f"cloud: {e.message}")
                if attempt == self.config.cloud_retries:
                    raise
                await asyncio.sleep(min(self.config.retry_backoff_s * 2 ** attempt, 10.0))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _execute_once(self, state: _RunState, route: dict[str, Any],
                            params: GenerationParams) -> tuple[GenerationResult, float, int]:
        run = state.run
        try:
            if route["placement"] == "edge":
                result = await self.executor.edge(route["address"], params)
            else:
                result = await self.executor.cloud(params)
        except (Unavailable, Overloaded):
            await self.scheduler.report({**_report_base(run, route), "ok": False})
            raise
        except HeraError:  # the engine refused the request (too long, bad settings): free the node, blame nothing
            await self.scheduler.report({**_report_base(run, route), "ok": True, "release_only": True})
            raise
        state.engine_calls += 1
        state.cache_hits += int(result.cache_hit)
        cached = _cached_prompt_tokens(state, route, params, result)
        # A check that wrote (rewrite_below) bills its reading here; the writing is billed to the step
        # it wrote (_bill_write), once the policy has said which step that is.
        wrote = result.rewritten_segment is not None
        cost = await self.scheduler.report({**_report_base(run, route), "prompt_tokens": result.prompt_tokens,
                                            "cached_prompt_tokens": cached,
                                            "completion_tokens": 0 if wrote else result.completion_tokens, "ok": True,
                                            "check": bool(params.candidate)})
        return result, cost, cached

    async def _bill_write(self, state: _RunState, route: dict[str, Any], result: GenerationResult,
                          check: bool = False) -> float:
        """Report what a check's own call wrote (its completion tokens; its prompt was billed with
        the check) as a step of ``route``'s side, or, with ``check``, as part of the check (the
        policy kept the step the engine wrote in place of); returns its cost."""
        return await self.scheduler.report({**_report_base(state.run, route), "prompt_tokens": 0,
                                            "cached_prompt_tokens": 0, "completion_tokens": result.completion_tokens,
                                            "ok": True, "check": check})


def _cached_prompt_tokens(state: _RunState, route: dict[str, Any], params: GenerationParams,
                          result: GenerationResult) -> int:
    """The prompt tokens a provider's prefix cache would hit: those of this side's previous call in
    the request when this prompt extends it (an open assistant message that grew), else 0.

    Only the previous call's *prompt* counts, as a cloud API's prompt cache does (its output is
    billed again as input the first time it is sent back). The TURNS fallback closes the message
    with a new user turn every step, so its prompts do not extend each other: counted uncached.
    A backend whose API reports the cached count (OpenAI's) is taken at its word. Not modelled: a
    provider's minimum cacheable prompt (OpenAI: 1,024 tokens, in steps of 128).

    Step mode: a session's calls resend the conversation with the new turns after it, so a call's
    prompt extends the previous call's on the same side (kept per session by :meth:`Agent.call`).
    """
    side = "cloud" if route["placement"] != "edge" else route["node_id"]
    if params.chat:  # step mode: the conversation, left open at its end, so that the next call's extends it
        chain = params.chat[:-1]
    else:
        chain = params.messages[-1][1] if params.continue_final_message else ("" if len(params.messages) == 2 else None)
    previous = state.last_call.get(side)
    cached = 0
    if result.cached_prompt_tokens is not None:  # the provider said what it billed as cached
        cached = max(0, min(result.cached_prompt_tokens, result.prompt_tokens))
    elif chain is not None and previous is not None and chain.startswith(previous.chain):
        cached = min(previous.prompt_tokens, result.prompt_tokens)
    elif chain is not None and previous is not None and previous.chain.startswith(chain):
        # This prompt is a prefix of the previous one (the LLM rewrites a step it just scored).
        cached = min(previous.prompt_tokens, result.prompt_tokens)
    held = result.prompt_tokens
    if chain is not None and params.candidate:  # a scored candidate stays in the cache after the prompt,
        k = result.rewritten_segment  # up to the segment the model wrote in place of (what it wrote is output)
        if k is None:
            chain += params.candidate
        else:
            bounds = (0, *params.candidate_splits, len(params.candidate))
            chain += params.candidate[:bounds[k]]
            held -= sum((result.segment_tokens or [len(result.logprobs or ())])[k:])
    if chain is None:  # a closed turn: the next call cannot extend this one
        state.last_call.pop(side, None)
    else:
        state.last_call[side] = _LastCall(chain, held)
    return cached


def _report_base(run: AgentRun, route: dict[str, Any]) -> dict[str, Any]:
    # report_id: the ledger row's key, made here so that a call Ray retries (the scheduler restarted)
    # is stored once.
    return {"request_id": run.request_id, "placement": route["placement"], "node_id": route["node_id"],
            "prices": route.get("prices", {}), "report_id": uuid.uuid4().hex}
