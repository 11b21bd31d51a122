"""The policy interface: given a subtask's context, say where it runs and why."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Decision:
    placement: Placement
    #: Which rule decided (e.g. "all-slm", "random"; HERA's are "urc", "sse", "cd", "sd", "llm").
    stage: str
    scores: dict[str, float] = field(default_factory=dict)
    #: For the edge: which edge model to run it on (None: the scheduler's default edge model).
    edge_model: str | None = None


class Policy(abc.ABC):
    """Decides edge or cloud for one subtask. Async, so a policy may consult estimator services."""

    name: str = ""
    description: str = ""

    @abc.abstractmethod
    async def decide(self, ctx: SubtaskContext) -> Decision: ...
