"""The interface the HERA policy needs from its estimators, and nothing more.

* **URC** ``request_simple_prob(question)``: probability the whole request is simple enough for
  the SLM alone.
* **SP** ``predict_subtask(side, ctx, extra)``: the next subtask the SLM (``side="slm"``) or the
  LLM (``side="llm"``) would write, given the context plus ``extra`` predicted SLM subtasks
  (for rolling forward).
* **DP** ``distance(ctx)``: how many more SLM subtasks until the SLM's subtask lines up with the
  LLM's current one; ``None`` means never (∞).
* **SD** ``decompose(subtask, ctx)``: sub-subtasks of a subtask.
* **SBERT** ``similarity(a, b)``: cosine similarity of sentence embeddings, in [-1, 1].

All are async so implementations may call Serve deployments.
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence

from hera_ray.policy.base import SubtaskContext

Side = Literal["slm", "llm"]


class EstimatorSet(Protocol):
    async def request_simple_prob(self, question: str) -> float: ...

    async def predict_subtask(self, side: Side, ctx: SubtaskContext, extra: tuple[str, ...] = ()) -> str: ...

    async def distance(self, ctx: SubtaskContext, slm_next: str | None = None,
                       slm_logprobs: Sequence[float] | None = None) -> int | None:
        """DP: the S-L distance class (None: beyond max); ``slm_next`` is the SLM's next subtask, which a
        set trained with ``dp_input`` "context+slm" or "confidence" reads; ``slm_logprobs``, its token
        log-probabilities when the SLM wrote it (else a "confidence" set scores it itself)."""
        ...

    async def decompose(self, subtask: str, ctx: SubtaskContext) -> list[str]: ...

    async def similarity(self, a: str, b: str) -> float: ...


def history_steps(ctx: SubtaskContext) -> list[tuple[str, str]]:
    """The (subtask, result) steps before this subtask: what every estimator prompt renders."""
    return [(h.subtask, h.output) for h in ctx.history]
