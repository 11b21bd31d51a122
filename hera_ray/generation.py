"""The generation request and result shared by every model backend (edge llama.cpp workers,
the cloud deployment's llama.cpp, vLLM and OpenAI-compatible backends), with the checks that do
not depend on the model. Plain dataclasses: no Ray, no torch, no grpc.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from hera_ray.errors import ContextLengthExceeded, InvalidRequest

CHAT_ROLES = ("system", "user", "assistant")
#: ``stop_reason`` of a backend that cannot tell a stop string from the end of the message
#: (OpenAI's API reports "stop" for both).
STOP_UNKNOWN = "<unknown>"
#: ``stop_reason`` when ``stop_at_line_end`` ended the generation.
LINE_END = "\n"
MAX_STOP_STRINGS = 16
#: A scored candidate's segments at most (``GenerationParams.candidate_splits``).
MAX_CANDIDATE_SEGMENTS = 64


@dataclass(frozen=True)
class GenerationParams:
    """One generation request, transport-neutral."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    model: str = ""
    request_id: str = ""
    #: ``messages`` ends with an assistant message that the model continues (no new turn): the
    #: chat template up to the assistant's header, then that message's content, left open. The
    #: name and meaning are vLLM's and Hugging Face's ``continue_final_message``.
    continue_final_message: bool = False
    #: End after the first generated token whose text holds a newline, keeping that token (an agent
    #: step is one line of the chain of thought; the newline, or several, stay in the step's text).
    #: llama.cpp and vLLM stop on those token ids and keep the token's text; an OpenAI-compatible
    #: endpoint gets stop="\n" and drops it (the agent puts the newline back).
    #: ``stop_reason`` is then "\n".
    stop_at_line_end: bool = False
    #: Return the log-probability of each generated token under the model (before temperature and
    #: sampling: the model's own distribution), in ``GenerationResult.logprobs``. As OpenAI's and
    #: vLLM's ``logprobs``.
    logprobs: bool = False
    #: Text to *score* instead of writing: the model reads the prompt, then this text, in one prefill
    #: (over its cached prefix), and returns the log-probability of each of the text's tokens
    #: (``logprobs``) and of the token it would have chosen at each position (``top_logprobs``).
    #: Nothing is generated (``max_tokens`` may be 0); the text's tokens count as prompt tokens.
    #: vLLM calls this ``prompt_logprobs``; the step check of SpecReason and RSD reads it. (llama.cpp
    #: reuses its KV cache for the prompt; vLLM does not read its prefix cache for such a request, so
    #: there the whole prompt is prefilled again.)
    candidate: str = ""
    #: With ``candidate``: where its 2nd, 3rd, ... segments begin (offsets into it, rising). Several
    #: steps scored in one prefill: the first segment is tokenised with the prompt (as a lone
    #: candidate is), each later one on its own, so that every token belongs to one segment and the
    #: caller can split the scores per step (``GenerationResult.segment_tokens``).
    candidate_splits: tuple[int, ...] = ()
    #: With ``candidate`` and ``max_tokens`` > 0: check, then write, in one call. One bar per
    #: segment (or one for all; 0: the segment is kept whatever it scores). The model scores each
    #: segment (:func:`segment_score`); at the first that scores under its bar, it drops that
    #: segment and the ones after it from its context and writes in their place, from where the
    #: segment began, as it would for a prompt that ended there (the stop settings apply). When
    #: every segment clears its bar, nothing is written. The prompt and the candidate are read once
    #: (prompt tokens); the new text is the completion (``GenerationResult.rewritten_segment`` says
    #: which segment it replaces). An engine may stop reading at the rejected segment (llama.cpp
    #: reads a segment at a time): the scores, ``segment_tokens`` and prompt tokens then end there. SpecReason's and RSD's check-then-rewrite, over one KV cache,
    #: without a second request that reads the prompt again. Empty: score only.
    rewrite_below: tuple[float, ...] = ()
    #: Instead of ``messages``: the conversation as a JSON array of OpenAI-style message objects
    #: (``role``, ``content``; an assistant's ``tool_calls`` with ``arguments`` as objects; a tool
    #: message's ``tool_call_id``), for the model's chat template. A string, so that the request
    #: stays hashable and crosses gRPC and Ray as it is.
    chat: str = ""
    #: A JSON array of tool schemas (OpenAI's ``tools``) for the chat template.
    tools: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def chat_messages(self) -> list[dict[str, Any]]:
        """``chat`` parsed, or ``messages`` as message objects."""
        if self.chat:
            return json.loads(self.chat)
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_s: float
    queue_s: float
    finish_reason: str
    request_id: str = ""
    #: The stop string that ended generation ("" if the model ended its message or hit max_tokens).
    stop_reason: str = ""
    #: Prompt tokens the provider billed as cached, when its API says (OpenAI's
    #: ``usage.prompt_tokens_details.cached_tokens``); None: the agent counts them itself.
    cached_prompt_tokens: int | None = None
    #: Per token: the generated tokens' log-probabilities (``logprobs=True``), or a scored
    #: ``candidate``'s; None when not asked for.
    logprobs: list[float] | None = None
    #: For a scored candidate: at each of its positions, the log-probability of the model's own
    #: most likely token (equal to ``logprobs[i]`` where the model would have written the same token).
    top_logprobs: list[float] | None = None
    #: The engine answered from its generation cache (:mod:`hera_ray.gencache`), not by running the model.
    cache_hit: bool = False
    #: A candidate scored in segments (``candidate_splits``): how many of ``logprobs`` belong to each.
    segment_tokens: list[int] | None = None
    #: A check that may write (``rewrite_below``): the segment the model scored under the bar and
    #: wrote in place of (``text``); None when every segment cleared it and nothing was written.
    rewritten_segment: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def params_from_dict(d: dict[str, Any]) -> GenerationParams:
    d = dict(d)
    d["messages"] = tuple(tuple(m) for m in d.get("messages", ()))
    d["stop"] = tuple(d.get("stop", ()))
    d["candidate_splits"] = tuple(d.get("candidate_splits", ()))
    d["rewrite_below"] = tuple(d.get("rewrite_below", ()))
    return GenerationParams(**d)


def candidate_segments(p: GenerationParams) -> list[str]:
    """``candidate`` cut at ``candidate_splits`` (one segment without splits; none without a candidate)."""
    if not p.candidate:
        return []
    edges = (0, *p.candidate_splits, len(p.candidate))
    return [p.candidate[a:b] for a, b in zip(edges, edges[1:])]


def segment_score(logprobs: Sequence[float] | None, top_logprobs: Sequence[float] | None,
                  line_end: bool = True) -> float:
    """How much a model stands behind a segment it scored: exp(mean(log p(token) - log p(top token)));
    1.0 where it would have written exactly these tokens. 0 without scores.

    With ``line_end`` (the segment ends with a newline) its last token is left out, unless it is the
    only one: a step is cut right after the token holding its newline, and the text re-tokenised
    for scoring ends in a piece the model would not write alone (it writes "):\n" and the next
    line's indentation as one token, so the shorter "):\n" scores low even when the model agrees
    with every character before it). A segment that ended the message, or was cut by its token
    cap, is scored whole: its last token is real text (the last digit of an answer)."""
    if not logprobs:
        return 0.0
    tops = list(top_logprobs or ())
    if len(tops) != len(logprobs):
        tops = [0.0] * len(logprobs)  # no top choice known: plain token probabilities
    pairs = list(zip(logprobs, tops))
    if line_end and len(pairs) > 1:
        pairs = pairs[:-1]
    return math.exp(sum(min(0.0, lp - top) for lp, top in pairs) / len(pairs))


def rejects(p: GenerationParams, k: int, logprobs: Sequence[float], top_logprobs: Sequence[float]) -> bool:
    """Segment ``k`` of ``p``'s candidate, with these scores (its tokens'), is under its bar
    (``p.rewrite_below``; a bar of 0 keeps it whatever it scores)."""
    segment = candidate_segments(p)[k]
    bar = p.rewrite_below[k] if len(p.rewrite_below) > 1 else p.rewrite_below[0]
    return bar > 0 and segment_score(logprobs, top_logprobs, segment.endswith("\n")) < bar


def first_rejected(p: GenerationParams, logprobs: Sequence[float], top_logprobs: Sequence[float],
                   counts: Sequence[int]) -> int | None:
    """The first of ``p``'s candidate segments (``counts``: its tokens in each) under its bar
    (:func:`rejects`); None when all clear theirs."""
    start = 0
    for k, n in enumerate(counts):
        if rejects(p, k, logprobs[start:start + n], top_logprobs[start:start + n]):
            return k
        start += n
    return None


def validate_params(p: GenerationParams, n_ctx: int | None = None) -> None:
    """Refuse an empty prompt or out-of-range settings with a message naming the field and the limit."""
    if p.max_tokens < 0 or (p.max_tokens == 0 and not p.candidate):
        raise InvalidRequest(f"max_tokens must be > 0, got {p.max_tokens}"
                             + (" (0 is allowed only when scoring a candidate)" if p.max_tokens == 0 else ""))
    if n_ctx is not None and p.max_tokens > n_ctx:
        raise ContextLengthExceeded(f"max_tokens {p.max_tokens} exceeds the context window of {n_ctx} tokens")
    if not 0.0 <= p.temperature <= 5.0:
        raise InvalidRequest(f"temperature must be in [0, 5], got {p.temperature}")
    if p.top_p is not None and not 0.0 < p.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k is not None and p.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {p.top_k}")
    if p.candidate_splits:
        if not p.candidate:
            raise InvalidRequest("candidate_splits splits a candidate: give the candidate too")
        if len(p.candidate_splits) >= MAX_CANDIDATE_SEGMENTS:
            raise InvalidRequest(f"candidate_splits makes at most {MAX_CANDIDATE_SEGMENTS} segments, "
                                 f"got {len(p.candidate_splits) + 1}")
        edges = (0, *p.candidate_splits, len(p.candidate))
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise InvalidRequest(f"candidate_splits must rise strictly inside the candidate (0 < split < "
                                 f"{len(p.candidate)}), got {list(p.candidate_splits)}")
    if p.rewrite_below:
        if not p.candidate or p.max_tokens == 0:
            raise InvalidRequest("rewrite_below writes in place of a candidate's rejected segment: give the candidate "
                                 "and max_tokens > 0")
        n = len(p.candidate_splits) + 1
        if len(p.rewrite_below) not in (1, n):
            raise InvalidRequest(f"rewrite_below takes one bar, or one per segment ({n}), got {len(p.rewrite_below)}")
        if not all(0.0 <= b <= 1.0 for b in p.rewrite_below):
            raise InvalidRequest(f"rewrite_below's bars must be in [0, 1], got {list(p.rewrite_below)}")
    if len(p.stop) > MAX_STOP_STRINGS or any(not s for s in p.stop):
        raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
    if sum(map(bool, (p.prompt, p.messages, p.chat))) > 1:
        raise InvalidRequest("give one of prompt, messages or chat, not several")
    if p.chat:
        _check_chat(p)
    elif p.tools:
        raise InvalidRequest("tools need the conversation as chat (a JSON array of messages)")
    for role, _content in p.messages:
        if role not in CHAT_ROLES:
            raise InvalidRequest(f"message role {role!r} is not one of {', '.join(CHAT_ROLES)}")
    if p.continue_final_message and not p.chat and (not p.messages or p.messages[-1][0] != "assistant"):
        raise InvalidRequest("continue_final_message needs messages that end with an assistant message to continue")
    if p.chat:
        pass  # checked by _check_chat
    elif p.messages:
        if not any(c.strip() for _r, c in p.messages):
            raise InvalidRequest("empty prompt: every message's content is empty")
    elif not p.prompt.strip():
        raise InvalidRequest("empty prompt: give a non-empty prompt or messages")


def _check_chat(p: GenerationParams) -> None:
    """``chat`` must be a non-empty JSON array of message objects with known roles, and ``tools`` a
    JSON array of objects; a message ends open (``continue_final_message``) only as an assistant's."""
    try:
        messages = json.loads(p.chat)
        tools = json.loads(p.tools) if p.tools else []
    except (json.JSONDecodeError, RecursionError) as e:
        raise InvalidRequest(f"chat and tools must be JSON: {e}") from None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("chat must be a non-empty JSON array of message objects")
    for i, m in enumerate(messages):
        if m.get("role") not in CHAT_ROLES + ("tool",):
            raise InvalidRequest(f"chat[{i}].role {m.get('role')!r} is not one of {', '.join(CHAT_ROLES + ('tool',))}")
        if not isinstance(m.get("content", ""), (str, type(None))):
            raise InvalidRequest(f"chat[{i}].content must be a string (text parts are joined before they get here)")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidRequest("tools must be a JSON array of tool objects")
    if p.continue_final_message and messages[-1].get("role") != "assistant":
        raise InvalidRequest("continue_final_message needs a chat that ends with an assistant message to continue")
