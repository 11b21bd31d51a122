"""Step mode: each call of the caller's own agent is one subtask (pure helpers; the ingress uses them).

An agent built on the OpenAI SDK, LangChain or similar already runs its own loop: it calls the
model, runs the tools the model asked for, and calls again. Pointed at hera-ray with the model
``step:<policy>`` (``step:hera-verify``, ``step:all-llm``, ``step:random@0.3``...), every such call
is placed by the policy and answered, as it stands, by the model the policy chose:

* **session**: the calls of one agent run belong together: the policy's once-per-request decisions
  (URC) and node affinity follow it. Its id is the ``X-Hera-Session`` header when given, else the
  ``user`` field when given, else a hash of the conversation's opening (its messages up to the
  first user message, which every later call of the same run repeats); each under the caller's API
  key, so no caller shares another's session. A ``user`` names one session: a client that sends
  one ``user`` for many runs sends each its own header. Each call is billed on its own in the ledger (its ``max_cloud_cost``
  caps that call), and charged to the API key's budget.
* **position**: the subtask's index is the number of assistant turns before the call.
* **context**: the policy's "question" is the first user message (the task); its history is the
  conversation after it, one step per message (a tool call as its JSON, a tool result as its text).
* **reply**: tool calls in the model's text come back as OpenAI ``tool_calls`` (:mod:`hera_ray.tools`);
  where the call ran and why is in the response's ``hera`` field, which OpenAI clients ignore.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from hera_ray.agent.loop import TraceEntry
from hera_ray.generation import GenerationParams
from hera_ray.serve.protocol import STEP_PREFIX, ChatMessage, StepChatCompletionRequest
from hera_ray.tools import ParsedReply, parse_tool_calls

SESSION_HEADER = "x-hera-session"
#: The least positive 32-bit float.
FLOAT32_LEAST = 1.401298464324817e-45
#: Policies that need a whole chain (the cascade reviews the SLM's finished answer): no step mode.
CHAIN_ONLY = ("cascade",)


def step_policy(model: str) -> str | None:
    """The policy a step-mode model name selects (``step:hera-verify`` -> ``hera-verify``), else None."""
    return model[len(STEP_PREFIX):] if model.startswith(STEP_PREFIX) else None


def session_id(req: StepChatCompletionRequest, header: str | None, key_name: str | None = None) -> str:
    """The agent run this call belongs to, under the caller's key: the header, else ``user``, else the
    conversation's opening (its messages up to the first user message)."""
    owner = key_name or "open"
    if header and header.strip():
        return f"{owner}:session-{header.strip()[:200]}"
    if req.user and req.user.strip():
        return f"{owner}:user-{req.user.strip()}"
    opening = []
    for m in req.messages:
        opening.append({"role": m.role, "content": m.text()})
        if m.role == "user":
            break
    digest = hashlib.sha256(json.dumps([req.model, opening], sort_keys=True).encode()).hexdigest()[:16]
    return f"{owner}:conv-{digest}"


def position(req: StepChatCompletionRequest) -> int:
    """The call's index in its agent run: the assistant turns before it."""
    return sum(m.role == "assistant" for m in req.messages)


def _as_step(m: ChatMessage) -> str:
    text = m.text().strip()
    calls = [json.dumps({"name": c.function.name, "arguments": c.function.parsed_arguments()})
             for c in m.calls()]
    return "\n".join([text] * bool(text) + calls) or "(empty)"


def context(req: StepChatCompletionRequest, placements: dict[int, str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(question, history) as the policy sees them: the first user message, then one step per message
    after it; an assistant turn's placement where this session placed it (``placements``, by position),
    else "cloud"."""
    placements = placements or {}
    first = next((i for i, m in enumerate(req.messages) if m.role == "user"), 0)
    question = "\n\n".join(m.text().strip() for m in req.messages[: first + 1] if m.text().strip())
    history, turn = [], 0
    for m in req.messages[first + 1:]:
        placement = "cloud"
        if m.role == "assistant":
            placement = placements.get(turn, "cloud")
            turn += 1
        step = _as_step(m)
        history.append({"subtask": step, "output": step, "placement": placement})
    return question or "(no user message)", history


def call_params(req: StepChatCompletionRequest, max_tokens: int, temperature: float) -> GenerationParams:
    """The call as the engines take it: the conversation and tools as JSON for the chat template.
    ``tool_choice`` "none" leaves the tools out of the prompt."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()] if req.tool_choice != "none" else []
    return GenerationParams(
        chat=json.dumps([m.to_chat() for m in req.messages], ensure_ascii=False),
        tools=json.dumps(tools, ensure_ascii=False) if tools else "",
        max_tokens=req.max_output_tokens() or max_tokens,
        temperature=temperature if req.temperature is None else req.temperature,
        # The engines take top_p as a 32-bit float: a positive value below its least would arrive as 0.
        top_p=None if req.top_p is None else max(req.top_p, FLOAT32_LEAST),
        seed=req.seed,
        stop=req.stop_strings(),
    )


def parse_reply(req: StepChatCompletionRequest, text: str) -> ParsedReply:
    names = [t.function.name for t in req.tools or ()] if req.tool_choice != "none" else []
    reply = parse_tool_calls(text, names)
    if req.parallel_tool_calls is False and len(reply.tool_calls) > 1:  # one call per turn, as asked
        reply.failures.append(f"parallel_tool_calls is false: {len(reply.tool_calls) - 1} more call(s) dropped")
        reply.tool_calls = reply.tool_calls[:1]
    return reply


def finish_reason(entry: TraceEntry, reply: ParsedReply) -> str:
    if reply.tool_calls:
        return "tool_calls"
    return "length" if entry.finish_reason == "length" else "stop"


def usage(entry: TraceEntry) -> dict[str, Any]:
    prompt = entry.prompt_tokens + entry.check_prompt_tokens
    cached = entry.cached_prompt_tokens + entry.check_cached_prompt_tokens
    completion = entry.completion_tokens + entry.check_completion_tokens  # a check's write nothing kept
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def hera_field(entry: TraceEntry, session: str, index: int, reply: ParsedReply, policy: str) -> dict[str, Any]:
    """Where the call ran and why (the response's ``hera`` field)."""
    return {"mode": "step", "policy": policy, "session": session, "position": index,
            "placement": entry.placement, "node": entry.node, "model": entry.model, "stage": entry.stage,
            "scores": entry.scores, "fallback": entry.fallback,
            "cost": entry.cost + entry.speculative_cost + entry.check_cost, "latency_s": entry.latency_s,
            "decision_s": entry.decision_s, "rejected_output": entry.rejected_output,
            "tool_parse_failures": reply.failures, "trace": entry.__dict__}


def completion(model: str, entry: TraceEntry, reply: ParsedReply, hera: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return {"id": f"chatcmpl-{hera['session']}-{hera['position']}-{int(time.time() * 1000)}",
            "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(entry, reply), "logprobs": None}],
            "usage": usage(entry), "hera": hera}


def stream_chunks(model: str, entry: TraceEntry, reply: ParsedReply, hera: dict[str, Any],
                  include_usage: bool) -> list[dict[str, Any]]:
    """The reply as OpenAI streams it: the role, the content, each tool call (id and name, then its
    arguments), the finish reason with the ``hera`` field, and the usage if asked for. The reply is
    decided before it is streamed (a policy may discard the SLM's reply), so it comes in one piece."""
    cid, created = f"chatcmpl-{hera['session']}-{hera['position']}-{int(time.time() * 1000)}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}

    out = [chunk({"role": "assistant", "content": ""})]
    if reply.content:
        out.append(chunk({"content": reply.content}))
    for i, call in enumerate(reply.tool_calls):
        fn = call["function"]
        out.append(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                          "function": {"name": fn["name"], "arguments": ""}}]}))
        out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}))
    out.append(chunk({}, finish_reason(entry, reply), hera=hera))
    if include_usage:
        out.append({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                    "usage": usage(entry)})
    return out
