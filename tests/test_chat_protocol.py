"""The chat-completions request as agent frameworks send it: what is accepted, and what is refused
with a message that names the field (the ingress turns these into 400s)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hera_ray.serve.protocol import ChatCompletionRequest

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                        "b": {"type": "number"}},
                                                       "required": ["a", "b"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}


def request(messages, **fields):
    return ChatCompletionRequest.model_validate({"model": "hera-verify", "messages": messages, **fields})


def refused(messages, **fields) -> str:
    with pytest.raises(ValidationError) as e:
        request(messages, **fields)
    err = e.value.errors()[0]
    return ".".join(str(p) for p in err["loc"]) + ": " + err["msg"]


def test_what_langchain_and_the_openai_sdk_send_is_accepted():
    r = request([{"role": "system", "content": "Use the tools."},
                 {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]},
                 {"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "5"}],
                tools=[ADD], tool_choice="auto", stop=["\n\n"], max_completion_tokens=64, temperature=0, seed=7,
                user="alice", stream=True, stream_options={"include_usage": True}, n=1, parallel_tool_calls=True,
                presence_penalty=0, frequency_penalty=0, logprobs=False, response_format={"type": "text"},
                store=False, metadata={"run": "1"}, service_tier="auto", modalities=["text"], top_logprobs=0)
    assert r.question() == "Use the tools.\n\nWhat is 2 + 3?"
    assert r.max_output_tokens() == 64 and r.stop_strings() == ("\n\n",)
    chat = [m.to_chat() for m in r.messages]
    assert chat[2]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}  # an object, as templates read it
    assert chat[3] == {"role": "tool", "content": "5", "tool_call_id": "call_1"}
    assert request([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]).messages[0].to_chat()["role"] == "system"


@pytest.mark.parametrize("messages, fields, named", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], {}, "'image_url' part"),
    ([{"role": "user", "content": "hi"}], {"n": 2}, "n:"),
    ([{"role": "user", "content": "hi"}], {"logprobs": True}, "logprobs"),
    ([{"role": "user", "content": "hi"}], {"presence_penalty": 0.5}, "presence_penalty"),
    ([{"role": "user", "content": "hi"}], {"response_format": {"type": "json_object"}}, "response_format"),
    ([{"role": "user", "content": "hi"}], {"functions": []}, "functions"),  # an unknown field is named, not ignored
    ([], {}, "messages"),  # an empty conversation
    ([{"role": "assistant", "content": "hello"}], {}, "no non-empty user"),
    # a malformed tool schema
    ([{"role": "user", "content": "hi"}], {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters"),
    ([{"role": "user", "content": "hi"}], {"tools": [{"type": "function", "function": {"name": "add me"}}]}, "tools.0.function.name"),
    ([{"role": "user", "content": "hi"}], {"tools": [ADD, ADD]}, "same name"),
    ([{"role": "user", "content": "hi"}], {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice"),
    # a tool message without a matching call / an id that was never issued
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "5"}], {}, "call_9"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}], {}, "tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_1", "content": "5"}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}],
     {}, "already answered"),
    # arguments that are not JSON
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "add", "arguments": "{a: 2"}}]}], {}, "messages.1.tool_calls.0.function.arguments"),
    ([{"role": "user", "content": None}], {}, "content"),
    ([{"role": "user", "content": "hi"}], {"reasoning_effort": "high"}, "reasoning_effort"),
    ([{"role": "user", "content": "hi"}], {"modalities": ["text", "audio"]}, "modalities"),
    ([{"role": "user", "content": "hi", "tool_calls": [CALL]}], {}, "tool_calls"),
])
def test_what_cannot_be_honoured_is_refused_by_name(messages, fields, named):
    assert named in refused(messages, **fields)
