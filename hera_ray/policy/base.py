"""The policy interface: given a subtask's context, say where it runs and why."""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable
from enum import Enum


class Placement(str, Enum):
    EDGE = "edge"
    CLOUD = "cloud"


@dataclass(frozen=True)
class PastStep:
    subtask: str
    output: str
    placement: Placement


@dataclass(frozen=True)
class SubtaskContext:
    """What a policy may look at: the request, the position of the subtask, and what came before."""

    request_id: str
    question: str
    index: int
    history: tuple[PastStep, ...] = ()
    #: The subtask the edge SLM actually wrote for this position, when the agent ran it first
    #: because the policy asked to speculate (stage ``speculate``); None otherwise.
    slm_candidate: str | None = None
    #: The SLM's log-probability of each token of ``slm_candidate``, when its edge returned them.
    slm_logprobs: tuple[float, ...] | None = None
    #: After a ``verify`` decision: the cloud LLM's log-probabilities of the candidate's tokens (one
    #: prefill over its cached prefix), and of its own most likely token at each position.
    llm_logprobs: tuple[float, ...] | None = None
    llm_top_logprobs: tuple[float, ...] | None = None
    #: A review of the finished chain (after a decision with ``review``): the log-probability of
    #: every token the chain's steps generated, in order; None for a step's decision.
    chain_logprobs: tuple[float, ...] | None = None
    #: A review escalated this request: the LLM is answering it again from the start.
    escalated: bool = False


#: A decision's stage that means "run the SLM's step first, then ask again with its subtask".
SPECULATE = "speculate"


@dataclass(frozen=True)
class Decision:
    placement: Placement
    #: Which rule decided (e.g. "all-slm", "random"; HERA's are "urc", "sse", "cd", "sd", "llm").
    stage: str
    scores: dict[str, float] = field(default_factory=dict)
    #: For the edge: which edge model to run it on (None: the scheduler's default edge model).
    edge_model: str | None = None
    #: Ask the engine for the step's token log-probabilities (hera-verify reads the SLM's).
    logprobs: bool = False
    #: Ask the policy again when the chain is finished, with its tokens' log-probabilities
    #: (``SubtaskContext.chain_logprobs``): a cascade's check. CLOUD then means "answer again on the
    #: LLM from the start" (the chain so far is discarded), EDGE "keep the answer".
    review: bool = False
    #: A ``verify`` decision (hera-verify): the agent may hold the LLM's check of this step until this
    #: many borderline steps wait (the SLM writing on after them), then score them all in one prefill
    #: and ask again about each in order. The first step the LLM rejects is rewritten and the steps
    #: written after it are discarded, so each step is decided as a check of it alone would decide it.
    check_batch: int = 1
    #: A ``verify`` decision: the LLM may write in the check's own call (``GenerationParams.rewrite_below``)
    #: in place of the first step it scores under this bar, which the policy, asked again with the
    #: scores, would reject (its rewrite bar). 0: the check only scores; a rewrite is a second call.
    rewrite_below: float = 0.0


class Policy(abc.ABC):
    """Decides edge or cloud for one subtask. Async, so a policy may consult estimator services."""

    name: str = ""
    description: str = ""
    #: The policy's one operating-point knob, if it has one (``hera``: "threshold_base"); clients
    #: pick a value per request with the name ``<policy>@<value>`` (``hera@0.7``), for sweeps.
    knob: str = ""

    @abc.abstractmethod
    async def decide(self, ctx: SubtaskContext) -> Decision: ...

    def tuned(self, value: float) -> "Policy":
        """This policy at another value of its knob, named ``<name>@<value>`` (a new object that
        shares the estimators and per-request memos)."""
        other = self._at(value)
        other.name = f"{self.name}@{value:g}"
        return other

    def _at(self, value: float) -> "Policy":
        """The policy with its knob at ``value``; ValueError if out of range or without a knob."""
        raise ValueError(f"policy {self.name!r} has no knob to set with '@'")


class RequestMemo:
    """A value decided once per request (URC's or HybridLLM's P(simple)), kept for the request's
    later subtasks; the oldest requests are forgotten past ``max_requests``."""

    def __init__(self, max_requests: int = 10_000):
        self._values: OrderedDict[str, float] = OrderedDict()
        self._max = max_requests

    async def get(self, request_id: str, compute: Callable[[], Awaitable[float]]) -> float:
        value = self._values.get(request_id)
        if value is None:
            value = self._values[request_id] = await compute()
            while len(self._values) > self._max:
                self._values.popitem(last=False)
        return value
