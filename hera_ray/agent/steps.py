"""The step format, in one place: what an agent step is, how the next one is asked for on each
backend, and how the answer is read from the chain. The agent, the profiler and the bench use it.

**A step is one line of the model's own chain of thought.** The request is one chat turn::

    system:    STEP_SYSTEM_PROMPT ("solve the task step by step, end with a line 'Answer: ...'")
    user:      the task
    assistant: <step 0><step 1> ... <step i-1>        (left open; each step ends with its newline)

and the model chosen for step i *continues that open assistant message* (``continue_final_message``:
the chat template up to the assistant's header, then the steps so far). Both bundled models share
Qwen's chat template and tokenizer, so whichever side writes a step, the prompt of step i+1
extends the prompt of step i, and each side's prefix cache (llama.cpp's KV cache per slot, vLLM's
prefix caching, a cloud API's prompt cache) holds all but the newest steps. ``all-llm`` through
the agent writes what one chain-of-thought turn of the LLM writes, cut into steps.

**Where a step ends** (the step boundary), whichever comes first:

* the end of a line: generation stops after the first token whose text holds a newline
  (``stop_at_line_end``), and that token stays in the step, so a blank line (``".\n\n"``) stays
  with the line before it and the steps joined are exactly the text the model wrote;
* the step's token cap (``agent.max_tokens_per_step``): the step is cut mid-line; the next step
  goes on from the exact character where it stopped;
* the end of the model's message (end of sequence): the step is the chain's last.

A line is the natural unit of both models' chains of thought here: the 1.5B model writes one
line per reasoning step and rarely a blank line, so paragraphs would make most chains one step.

**Where the chain ends**: at the end of the model's message, or when the chain has written
``agent.max_chain_tokens`` tokens, or after ``max_steps`` steps. The answer is then read from the
whole chain by :func:`read_answer`: the last ``Answer: ...`` line (``Final Answer:``,
``**Answer:**``, ``\\boxed{...}``, ``#### ...`` and ``The answer is ...`` are read too).

**Backends.** llama.cpp (edge nodes and the cloud's CPU default) and vLLM continue the open
message natively and stop on the newline tokens' ids. An OpenAI-compatible endpoint stops on the
string ``"\n"``, which it does not return; the agent puts it back (the step's ``boundary``). One
that cannot continue a message (OpenAI's own API) gets the documented fallback,
:data:`StepFormat.TURNS`: the steps so far as an assistant turn, then a user turn
:data:`TURNS_NEXT` asking for the next step (:func:`step_messages`). The trace's ``step_format``
says which ran. A vLLM or SGLang server behind the ``openai`` backend continues natively when
``cloud.openai_continue_final_message`` is set.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable

from hera_ray.generation import LINE_END, STOP_UNKNOWN

#: The instruction of every request; the one-turn baseline (bench/step_format.py) uses the same.
STEP_SYSTEM_PROMPT = "Solve the task step by step. End with a line of the form 'Answer: <the final answer>'."
#: The step boundary: the end of a line.
STEP_BOUNDARY = LINE_END
#: The fallback format's request for the next step (endpoints that cannot continue a message).
TURNS_NEXT = ("Continue your solution from exactly where it stops: write only its next line, "
              "or the final 'Answer: ...' line if you are done.")
# A backend that cannot tell a stop string from the end of the message says so with STOP_UNKNOWN
# as ``stop_reason`` (OpenAI's API reports "stop" for both); the step then ends the chain only if
# it holds an answer line.


class StepFormat(str, enum.Enum):
    """How the next step is asked for."""

    #: The open assistant message is continued (llama.cpp, vLLM): step i+1's prompt extends step i's.
    CONTINUE = "continue"
    #: Fallback: the steps so far as an assistant turn, then a user turn asking for the next step.
    TURNS = "turns"


@dataclass(frozen=True)
class Step:
    """One step as the chain holds it."""

    text: str
    #: What the chain adds after the text: "" when the text holds its own line end (llama.cpp, vLLM)
    #: or was cut by its token cap; "\n" when a backend stopped on the string and dropped it.
    boundary: str = ""
    #: The model ended its message with this step.
    end: bool = False


def chain_text(steps: Iterable[Step]) -> str:
    """The open assistant message: the steps joined with their boundaries."""
    return "".join(s.text + s.boundary for s in steps)


def step_messages(question: str, chain: str, fmt: StepFormat = StepFormat.CONTINUE,
                  system: str = STEP_SYSTEM_PROMPT) -> tuple[tuple[str, str], ...]:
    """The chat messages that ask for the next step after ``chain`` (the steps so far, joined).

    With CONTINUE the last message is the open assistant message (send it with
    ``continue_final_message=True``, see :func:`continues`, and ``stop_at_line_end=True``). Step 0
    has no steps yet: it is asked exactly as one turn is (no empty assistant message, which some
    templates would render as a closed turn). With TURNS, the steps so far are a closed assistant
    turn followed by TURNS_NEXT.
    """
    head = (("system", system), ("user", question))
    if not chain:
        return head
    if fmt is StepFormat.CONTINUE:
        return (*head, ("assistant", chain))
    return (*head, ("assistant", chain.rstrip()), ("user", TURNS_NEXT))


def continues(fmt: StepFormat, chain: str) -> bool:
    """Whether the request for the next step continues an open assistant message."""
    return fmt is StepFormat.CONTINUE and bool(chain)


def one_turn_messages(question: str, system: str = STEP_SYSTEM_PROMPT) -> tuple[tuple[str, str], ...]:
    """The same request as one uninterrupted chat turn (the baseline the agent must keep)."""
    return (("system", system), ("user", question))


def checked_text(step_text: str) -> str:
    """The part of a step another model scores (hera-verify's LLM check): the step without the
    spaces or tabs after its last newline. A step ends with the first token holding a newline, and
    in code that token often carries the next line's indentation too ("):\n   "); scored alone,
    re-tokenised, that indentation is a token the model would never write there (it writes the
    indentation with the next word), and would sink a good step's score."""
    stripped = step_text.rstrip(" \t")
    return stripped if stripped.endswith("\n") else step_text


def make_step(text: str, finish_reason: str, stop_reason: str) -> Step:
    """A step from what the engine returned; where it stopped decides whether it ends the chain.

    ``finish_reason`` "length" (the step's token cap) cuts mid-line; ``stop_reason`` "\\n" is the
    end of a line (kept in the text by llama.cpp and vLLM, put back here for a backend that
    dropped it); "stop" with no stop string is the end of the message, and so of the chain.
    """
    if finish_reason == "length":
        return Step(text, "", False)
    if stop_reason == STOP_UNKNOWN:  # the backend cannot tell: an answer line (or nothing) ends the message
        end = not text.strip() or read_answer(text)[0] is not None
        return Step(text, "" if end or text.endswith(LINE_END) else STEP_BOUNDARY, end)
    if stop_reason == LINE_END:
        return Step(text, "" if LINE_END in text else STEP_BOUNDARY, False)  # the newline token may carry indentation
    if stop_reason:  # another stop string the caller gave
        return Step(text, "", False)
    return Step(text, "", True)


def chain_answer(chain: str) -> tuple[str, str, bool]:
    """(answer, final_text, found) of a finished chain: :func:`read_answer`, else the chain's last
    non-empty line stands for the answer (found is then False). The agent, the profiler and the
    benches all read answers this way."""
    answer, final_text = read_answer(chain)
    if answer is not None:
        return answer, final_text, True
    lines = [ln.strip() for ln in (chain or "").splitlines() if ln.strip()]
    return (lines[-1] if lines else ""), "", False


# -- reading the answer ---------------------------------------------------------------------------

_ANSWER_LINE = re.compile(
    r"^[ \t>*_#-]*(?:final[ \t]+)?answer[ \t*_]*(?:is[ \t]*)?[:：][ \t*_]*(?P<a>.*)$", re.IGNORECASE | re.MULTILINE)
_BOXED = re.compile(r"\\boxed\{(?P<a>(?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_IS = re.compile(r"\bthe (?:final )?answer is[ \t:]*(?P<a>[^\n]+)", re.IGNORECASE)
_HASHES = re.compile(r"^####[ \t]*(?P<a>.+)$", re.MULTILINE)


def read_answer(chain: str) -> tuple[str | None, str]:
    """(answer, final_text) read from a chain: the answer on the last answer line, and everything
    from that line on (several lines: e.g. a code block after ``Answer:``). (None, "") if none.

    >>> read_answer("3 + 2 = 5.\\n\\nAnswer: 5")
    ('5', '5')
    >>> read_answer("So the total is $\\\\boxed{18}$.")[0]
    '18'
    """
    chain = chain or ""
    for pattern in (_ANSWER_LINE, _HASHES, _BOXED, _ANSWER_IS):
        matches = list(pattern.finditer(chain))
        if not matches:
            continue
        m = matches[-1]
        answer = m.group("a").strip().strip("*_").strip()
        # From the answer on; a \boxed{} or "the answer is" match is read alone (no trailing "}.").
        final_text = chain[m.start("a"):].strip() if pattern in (_ANSWER_LINE, _HASHES) else answer
        boxed = _BOXED.search(answer) if pattern is not _BOXED else None
        if boxed:  # "Answer: $\boxed{18}$"
            answer = boxed.group("a").strip()
        if not answer and final_text:  # "Answer:" then the answer on the next lines (a code block)
            answer = final_text.splitlines()[0].strip()
        if answer:
            return answer, final_text
    return None, ""
