"""The agent loop: a request answered as a chain of subtasks, each placed by the scheduler.

At each step the chosen model writes the next subtask and its result in a fixed format::

    Subtask: <the next small step>
    Result: <what doing it gives>

or, when it knows the answer, ``Final Answer: <answer>``. The loop asks the scheduler where the
step runs, runs it there, records a trace entry, and stops at a final answer or the step limit.

Pure asyncio over two small interfaces (a scheduler and an executor), so it is tested without
Ray; the Serve ingress plugs in the SubtaskScheduler actor and real edge/cloud executors.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from hera_ray.config import AgentConfig
from hera_ray.errors import Overloaded, Unavailable
from hera_ray.generation import GenerationParams, GenerationResult
from hera_ray.policy.base import SPECULATE

SYSTEM_PROMPT = (
    "You solve the user's task in small steps. Each reply is exactly ONE step, in this format:\n"
    "Subtask: <the next small step>\n"
    "Result: <the result of doing that step>\n"
    "Check each result before you go on. When every step needed is done, reply with one line instead:\n"
    "Final Answer: <only the answer itself, e.g. a number, with no explanation>"
)
NEXT_STEP = ("Continue with the next step. Once the results so far answer the whole task, reply only with "
             "'Final Answer: <answer>'.")

# "Final Answer:" needs its colon or an "is" (a subtask may say "present the final answer");
# "the answer is" needs neither.
_FINAL = re.compile(r"(?:final\s+answer\s*[:：]|final\s+answer\s+is\s*[:：]?|the\s+answer\s+is\s*[:：]?)\s*(.+)",
                    re.IGNORECASE | re.DOTALL)
_HASHES = re.compile(r"####\s*(.+)")
_SUBTASK = re.compile(r"subtask\s*\d*\s*[:：]\s*(.*?)(?=\n\s*result\s*[:：]|\n\s*final\s+answer|\Z)", re.IGNORECASE | re.DOTALL)
_RESULT = re.compile(r"result\s*[:：]\s*(.*?)(?=\n\s*final\s+answer|\Z)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class ParsedStep:
    subtask: str
    result: str
    final_answer: str | None
    #: Everything after "Final Answer:" (several lines, e.g. a code block); "" without a final answer.
    final_text: str = ""


def parse_step(text: str) -> ParsedStep:
    """Read one step of model output. Never raises: unformatted output becomes the step's result."""
    text = (text or "").strip()
    final, final_text = None, ""
    m = _FINAL.search(text) or _HASHES.search(text)
    if m:
        final_text = m.group(1).strip()
        final = final_text.splitlines()[0].strip() if final_text else None
    sub = _SUBTASK.search(text)
    res = _RESULT.search(text)
    if sub:
        subtask = sub.group(1).strip()
        result = res.group(1).strip() if res else ""
    else:
        first, _, rest = text.partition("\n")
        subtask, result = first.strip(), (rest.strip() or first.strip())
    return ParsedStep(subtask=subtask, result=result, final_answer=final, final_text=final_text if final else "")


@dataclass
class TraceEntry:
    index: int
    subtask: str
    output: str
    placement: str
    node: str
    model: str
    stage: str
    scores: dict[str, float]
    fallback: str
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    cost: float
    latency_s: float
    decision_s: float
    generation_s: float  # the executor call, as the agent saw it (includes the transport)
    model_s: float = 0.0  # the model's own time: time to first token + decode, as the engine measured it
    retries: int = 0
    finish_reason: str = ""
    #: Time spent on an SLM step the policy then sent to the LLM (speculative SSE only).
    speculative_s: float = 0.0
    #: Attempts of this subtask that failed before it ran ("<node>: <error>"), oldest first: a node
    #: that died, froze past the subtask timeout or was full, or a cloud replica that died.
    failures: list[str] = field(default_factory=list)


@dataclass
class AgentRun:
    request_id: str
    policy: str
    question: str
    answer: str
    finished: bool  # the model gave a final answer (else the step limit ended the run)
    #: The whole final answer when it runs over several lines (a code block); ``answer`` is its first line.
    final_text: str = ""
    trace: list[TraceEntry] = field(default_factory=list)
    latency_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def slm_share(self) -> float:
        return sum(t.placement == "edge" for t in self.trace) / len(self.trace) if self.trace else 0.0

    @property
    def cost(self) -> float:
        return sum(t.cost for t in self.trace)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(slm_share=self.slm_share, cost=self.cost,
                 cloud_tokens=sum(t.tokens for t in self.trace if t.placement == "cloud"),
                 prompt_tokens=sum(t.prompt_tokens for t in self.trace),
                 completion_tokens=sum(t.completion_tokens for t in self.trace))
        return d


class Scheduler(Protocol):
    async def route(self, request: dict[str, Any], max_cloud_cost: float | None = None) -> dict[str, Any]: ...
    async def report(self, report: dict[str, Any]) -> float: ...
    async def finish(self, request_id: str) -> dict[str, Any]: ...


class Executor(Protocol):
    async def edge(self, address: str, params: GenerationParams) -> GenerationResult: ...
    async def cloud(self, params: GenerationParams) -> GenerationResult: ...


def step_messages(question: str, history: list[TraceEntry]) -> tuple[tuple[str, str], ...]:
    messages = [("system", SYSTEM_PROMPT), ("user", question)]
    for t in history:
        messages.append(("assistant", f"Subtask: {t.subtask}\nResult: {t.output}"))
        messages.append(("user", NEXT_STEP))
    return tuple(messages)


class Agent:
    def __init__(self, scheduler: Scheduler, executor: Executor, config: AgentConfig | None = None):
        self.scheduler = scheduler
        self.executor = executor
        self.config = config or AgentConfig()

    async def run(
        self,
        question: str,
        policy: str,
        request_id: str | None = None,
        max_steps: int | None = None,
        max_cloud_cost: float | None = None,
        on_step: Callable[[TraceEntry], Awaitable[None] | None] | None = None,
    ) -> AgentRun:
        request_id = request_id or uuid.uuid4().hex
        steps = max_steps or self.config.max_steps
        run = AgentRun(request_id=request_id, policy=policy, question=question, answer="", finished=False)
        t_run = time.perf_counter()
        try:
            for index in range(steps):
                entry, parsed = await self._step(run, index, max_cloud_cost)
                run.trace.append(entry)
                if on_step is not None:
                    maybe = on_step(entry)
                    if maybe is not None:
                        await maybe
                if parsed.final_answer:
                    run.answer, run.final_text, run.finished = parsed.final_answer, parsed.final_text, True
                    break
            if not run.finished and run.trace:
                run.answer = run.trace[-1].output
        finally:
            run.usage = await self.scheduler.finish(request_id)
            run.latency_s = time.perf_counter() - t_run
        return run

    async def _step(self, run: AgentRun, index: int, max_cloud_cost: float | None) -> tuple[TraceEntry, ParsedStep]:
        params = GenerationParams(
            messages=step_messages(run.question, run.trace),
            max_tokens=self.config.max_tokens_per_step,
            temperature=self.config.temperature,
            stop=("\nSubtask:",),
            request_id=f"{run.request_id}:{index}",
        )
        history = [{"subtask": t.subtask, "output": t.output, "placement": t.placement} for t in run.trace]
        request = {"request_id": run.request_id, "policy": run.policy, "index": index, "question": run.question,
                   "history": history, "exclude_nodes": []}
        t0 = time.perf_counter()
        decision_s = speculative_s = 0.0
        failures: list[str] = []
        while True:
            route = await self.scheduler.route(request, max_cloud_cost)
            decision_s += route["decision_s"]
            t_gen = time.perf_counter()
            try:
                result, cost = await self._execute(run, route, params, failures)
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
            parsed = parse_step(result.text)
            if route["stage"] == SPECULATE and route["placement"] == "edge":
                # The policy asked for the SLM's real step first: ask again with what it wrote.
                final = await self.scheduler.route({**request, "slm_candidate": parsed.subtask}, max_cloud_cost)
                decision_s += final["decision_s"]
                if final["placement"] == "edge":  # accepted: the step already ran; release the node pick
                    await self.scheduler.report({**_report_base(run, final), "ok": True})
                    route = {**final, "node_id": route["node_id"], "model": route["model"]}
                else:  # rejected: the LLM writes this step, and the SLM's time was spent for nothing
                    speculative_s = generation_s
                    t_gen = time.perf_counter()
                    result, cost2 = await self._execute(run, final, params, failures)
                    cost += cost2
                    generation_s = time.perf_counter() - t_gen
                    parsed = parse_step(result.text)
                    route = final
            entry = TraceEntry(
                index=index, subtask=parsed.subtask, output=parsed.result, placement=route["placement"],
                node=route["node_id"], model=route["model"], stage=route["stage"], scores=route["scores"],
                fallback=route["fallback"], prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, tokens=result.prompt_tokens + result.completion_tokens,
                cost=cost, latency_s=time.perf_counter() - t0, decision_s=decision_s, generation_s=generation_s,
                model_s=result.ttft_s + result.decode_s, retries=len(failures), finish_reason=result.finish_reason,
                speculative_s=speculative_s, failures=failures,
            )
            return entry, parsed

    async def _execute(self, run: AgentRun, route: dict[str, Any], params: GenerationParams,
                       failures: list[str]) -> tuple[GenerationResult, float]:
        """Run the step where ``route`` says and report it to the scheduler; (result, cost). A cloud
        step whose replica died or was full is tried again after a backoff (Serve replaces a dead
        replica); each failed try is added to ``failures``. An edge failure is raised for re-routing."""
        for attempt in range(self.config.cloud_retries + 1):
            try:
                return await self._execute_once(run, route, params)
            except (Unavailable, Overloaded) as e:
                if route["placement"] == "edge":
                    raise
                failures.append(f"cloud: {e.message}")
                if attempt == self.config.cloud_retries:
                    raise
                await asyncio.sleep(min(self.config.retry_backoff_s * 2 ** attempt, 10.0))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _execute_once(self, run: AgentRun, route: dict[str, Any],
                            params: GenerationParams) -> tuple[GenerationResult, float]:
        try:
            if route["placement"] == "edge":
                result = await self.executor.edge(route["address"], params)
            else:
                result = await self.executor.cloud(params)
        except (Unavailable, Overloaded):
            await self.scheduler.report({**_report_base(run, route), "ok": False})
            raise
        cost = await self.scheduler.report({**_report_base(run, route), "prompt_tokens": result.prompt_tokens,
                                            "completion_tokens": result.completion_tokens, "ok": True})
        return result, cost


def _report_base(run: AgentRun, route: dict[str, Any]) -> dict[str, Any]:
    return {"request_id": run.request_id, "placement": route["placement"], "node_id": route["node_id"],
            "price_per_1k_tokens": route["price_per_1k_tokens"]}
