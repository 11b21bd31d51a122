"""The inputs every estimator sees, written once for training (``hera train``) and serving.

The estimators do not see the agent's full chat: a compact, prefix-growing rendering of the
request and the steps so far is enough to tell what comes next, and it keeps the SP/SD prompts
short (prefill dominates an estimator call on a CPU) and reusable in llama.cpp's KV cache from
one decision of a request to the next.
"""

from __future__ import annotations

import re
from typing import Sequence

#: How much of a step's result the estimators see (the subtask line matters most).
RESULT_CHARS = 160
#: Tokens an SP prediction may take: a subtask is one short line.
SP_MAX_TOKENS = 40
SD_MAX_TOKENS = 96

SP_SYSTEM = "You predict the next step an assistant writes while solving a task step by step. Reply with the step only."
SD_SYSTEM = "Split the given step into two or three smaller steps. One step per line, each starting with '- '."

_SUBTASK_PREFIX = re.compile(r"^\s*(?:subtask|step)\s*\d*\s*[:：.]\s*", re.IGNORECASE)


def _short(text: str, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_context(question: str, steps: Sequence[tuple[str, str]], extra: Sequence[str] = ()) -> str:
    """The request and the (subtask, result) steps so far, then ``extra`` predicted subtasks (no results yet)."""
    lines = [f"Task: {_short(question, 1200)}"]
    for i, (subtask, result) in enumerate(steps, 1):
        lines.append(f"Step {i}: {_short(subtask, 240)}")
        if result and result.strip() != (subtask or "").strip():  # a chain-of-thought step is its own result
            lines.append(f"Result {i}: {_short(result, RESULT_CHARS)}")
    for j, subtask in enumerate(extra, len(steps) + 1):
        lines.append(f"Step {j}: {_short(subtask, 240)}")
    return "\n".join(lines)


def sp_messages(question: str, steps: Sequence[tuple[str, str]], extra: Sequence[str] = ()) -> list[dict[str, str]]:
    """SP's prompt: what is the next step? (The SLM and LLM adapters share it.)"""
    n = len(steps) + len(extra) + 1
    return [{"role": "system", "content": SP_SYSTEM},
            {"role": "user", "content": f"{render_context(question, steps, extra)}\nStep {n}:"}]


#: SP prompt formats. ``compact``: :func:`sp_messages` (the paper's SP: a separate small model
#: asked for the next step of a compact rendering). ``chain``: the agent's own step format (the
#: steps so far as one open assistant message, continued to the end of the line), so SP on the
#: edge SLM's own weights predicts the SLM's step by writing it, and SP_LLM's adapter learns how
#: the LLM's next line differs.
SP_FORMATS = ("compact", "chain")


def sp_chain_request(question: str, steps: Sequence[tuple[str, str]], extra: Sequence[str] = ()
                     ) -> tuple[list[dict[str, str]], bool]:
    """SP's prompt in the ``chain`` format: (messages, continue the final message?). The steps'
    outputs are the chain as the agent holds it; ``extra`` predicted steps are lines after them."""
    from hera_ray.agent.steps import step_messages

    chain = "".join(output or subtask for subtask, output in steps)
    if chain and not chain.endswith("\n") and extra:
        chain += "\n"
    chain += "".join(f"{e.strip()}\n" for e in extra)
    messages = [{"role": r, "content": c} for r, c in step_messages(question, chain)]
    return messages, bool(chain)


def sp_request(fmt: str, question: str, steps: Sequence[tuple[str, str]], extra: Sequence[str] = ()
               ) -> tuple[list[dict[str, str]], bool]:
    """SP's prompt in format ``fmt``: (messages, continue the final message?)."""
    if fmt == "chain":
        return sp_chain_request(question, steps, extra)
    return sp_messages(question, steps, extra), False


def sp_target(subtask: str) -> str:
    """What SP learns to write for a step: the step's line, on one line."""
    line = " ".join((subtask or "").split())
    return _SUBTASK_PREFIX.sub("", line)


def clean_prediction(text: str) -> str:
    """An SP output as a subtask: first line, without a 'Step n:'/'Subtask:' prefix."""
    first = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return _SUBTASK_PREFIX.sub("", first).strip()


def sd_messages(question: str, subtask: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SD_SYSTEM},
            {"role": "user", "content": f"Task: {_short(question, 600)}\nStep: {_short(subtask, 240)}"}]


def sd_target(parts: Sequence[str]) -> str:
    return "\n".join(f"- {sp_target(p)}" for p in parts)


def parse_parts(text: str, limit: int = 6) -> list[str]:
    """SD's output as sub-subtasks: the '- ' lines (or any non-empty lines)."""
    parts = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^(?:[-*•]|\d+[.)])\s*", "", line).strip()
        if line:
            parts.append(line)
    return parts[:limit]


#: DP's input: the request and the subtasks so far (``context``, the paper's), or that and the SLM's
#: next subtask (``context+slm``): what DP predicts is how far *that* step is from the LLM's path.
#: Both are read by a LoRA encoder. ``confidence``: what the SLM's next step shows of itself (its
#: token log-probabilities, length, shape and place; :mod:`hera_ray.estimators.logistic`), read by
#: a logistic regression.
DP_INPUTS = ("context", "context+slm", "confidence")


def encoder_context(question: str, steps: Sequence[tuple[str, str]], slm_next: str | None = None) -> str:
    """DP's input: the request and the subtasks so far (results omitted: the encoder's window is short),
    and with ``slm_next`` the SLM's next subtask last (the encoder keeps a long text's head and tail)."""
    lines = [_short(question, 800)]
    lines += [f"Step {i}: {_short(s, 200)}" for i, (s, _) in enumerate(steps, 1)]
    if slm_next is not None:  # as SP's prediction reads: the first line, without a "Step n:" prefix
        lines.append(f"SLM next: {_short(sp_target(clean_prediction(slm_next)), 200)}")
    return "\n".join(lines)


def distance_label(distance: int | None) -> str:
    return "inf" if distance is None else str(distance)


def distance_labels(max_distance: int) -> list[str]:
    return [str(d) for d in range(max_distance + 1)] + ["inf"]
