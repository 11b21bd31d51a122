"""Step mode's pure helpers: which session and position a call has, what the policy sees of it, and
how its reply streams (the ingress's live tests in ``tests/serving`` go through the same code)."""

from __future__ import annotations

import json

from hera_ray.agent.loop import TraceEntry
from hera_ray.serve.protocol import CHAT_COMPLETION_REQUEST
from hera_ray.serve.step_mode import context, position, session_id, step_policy, stream_chunks, usage
from hera_ray.tools import ParsedReply

OPENING = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is 2 + 3?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
LATER = OPENING + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "5"}]


def step(messages, **fields):
    return CHAT_COMPLETION_REQUEST.validate_python({"model": "step:hera-verify", "messages": messages, **fields})


def entry(**fields) -> TraceEntry:
    base = dict(index=0, subtask="", output="", placement="edge", node="edge-0", model="qwen-0.5b", stage="urc",
                scores={}, fallback="", prompt_tokens=40, completion_tokens=7, tokens=47, cost=0.0, latency_s=0.2,
                decision_s=0.01, generation_s=0.19, cached_prompt_tokens=30)
    return TraceEntry(**{**base, **fields})


def test_the_header_then_the_user_field_then_the_opening_name_the_session():
    assert session_id(step(OPENING, user="alice"), "run-42", "k1") == "k1:session-run-42"
    assert session_id(step(OPENING, user="alice"), None, "k1") == "k1:user-alice"
    assert session_id(step(OPENING, user="alice"), "  ", "k1") == "k1:user-alice"  # a blank header is none
    derived = session_id(step(OPENING), None, "k1")
    assert derived.startswith("k1:conv-")
    # every later call of the same run repeats the opening: the same session
    assert session_id(step(LATER), None, "k1") == derived
    # another task, or another caller's key: another session
    assert session_id(step([OPENING[0], {"role": "user", "content": "What is 4 + 4?"}]), None, "k1") != derived
    assert session_id(step(OPENING), None, "k2") == derived.replace("k1:", "k2:")
    assert session_id(step(OPENING), None).startswith("open:conv-")  # an ingress without keys


def test_position_counts_the_assistant_turns_before_the_call():
    assert position(step(OPENING)) == 0
    assert position(step(LATER)) == 1
    assert position(step(LATER + [{"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "Thanks"}])) == 2


def test_the_policy_sees_the_task_then_one_step_per_message_with_its_placement():
    question, history = context(step(LATER + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "Sure?"}]),
                                placements={0: "edge"})
    assert question == "Use the tools.\n\nWhat is 2 + 3?"
    assert [h["placement"] for h in history] == ["edge", "cloud", "cloud", "cloud"]  # turn 1 was not placed here
    assert json.loads(history[0]["subtask"]) == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert [h["subtask"] for h in history[1:]] == ["5", "5", "Sure?"]
    assert step_policy("step:hera-verify") == "hera-verify" and step_policy("hera") is None


def test_a_reply_streams_as_openai_streams_it():
    reply = ParsedReply(content="Let me add.", tool_calls=[CALL])
    hera = {"session": "k1:user-alice", "position": 1, "placement": "edge"}
    chunks = stream_chunks("step:hera-verify", entry(), reply, hera, include_usage=True)
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"content": "Let me add."}
    # a tool call: its id and name first, then its arguments, as OpenAI's SDK reassembles them
    assert deltas[2] == {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "add", "arguments": ""}}]}
    assert deltas[3] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 2, "b": 3}'}}]}
    assert chunks[4]["choices"][0]["finish_reason"] == "tool_calls" and chunks[4]["hera"] == hera
    assert chunks[5]["choices"] == [] and chunks[5]["usage"] == usage(entry())
    assert usage(entry())["prompt_tokens_details"] == {"cached_tokens": 30}
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    plain = stream_chunks("step:all-slm", entry(finish_reason="length"), ParsedReply(content="Red"), hera, include_usage=False)
    assert [c["choices"][0]["finish_reason"] for c in plain] == [None, None, "length"]
