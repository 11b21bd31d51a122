"""Reading tool calls from what models write: Hermes-style markers, and the bare or fenced JSON
small models write instead (the Qwen2.5-Coder outputs below are verbatim from this machine)."""

from __future__ import annotations

import json

import pytest

from hera_ray.tools import parse_tool_calls

TOOLS = ("add", "mul")


def args(reply, i=0):
    return json.loads(reply.tool_calls[i]["function"]["arguments"])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
    '{"name": "add", "arguments": {"a": 2, "b": 3}}',  # Qwen2.5-Coder-0.5B: no markers
    '```json\n{\n  "name": "add",\n  "arguments": {\n    "a": 2,\n    "b": 3\n  }\n}\n```',  # Qwen2.5-Coder-1.5B
    '{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}',  # arguments as a JSON string
])
def test_one_call_in_any_of_the_forms_models_write(text):
    reply = parse_tool_calls(text, TOOLS)
    assert reply.content is None and not reply.failures
    (call,) = reply.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "add"
    assert args(reply) == {"a": 2, "b": 3}


def test_several_calls_and_text_around_markers():
    reply = parse_tool_calls('Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                             '<tool_call>\n{"name": "mul", "arguments": {"a": 3, "b": 4}}\n</tool_call>', TOOLS)
    assert reply.content == "Let me compute." and [c["function"]["name"] for c in reply.tool_calls] == ["add", "mul"]
    assert len({c["id"] for c in reply.tool_calls}) == 2
    lines = parse_tool_calls('{"name": "add", "arguments": {"a": 5, "b": 5}}\n{"name": "mul", "arguments": {"a": 1, "b": 2}}', TOOLS)
    assert [c["function"]["name"] for c in lines.tool_calls] == ["add", "mul"] and lines.content is None


@pytest.mark.parametrize("text, failure", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 2,\n</tool_call>', "not JSON"),
    ('<tool_call>\n{"name": "sub", "arguments": {}}\n</tool_call>', "'sub' is not one of the tools"),
    ('<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>', "not an object"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1', "not JSON"),  # cut by max_tokens
])
def test_a_marked_block_that_is_no_call_stays_as_text_and_is_reported(text, failure):
    reply = parse_tool_calls(text, TOOLS)
    assert not reply.tool_calls and failure in reply.failures[0] and "<tool_call>" in reply.content


@pytest.mark.parametrize("text", [
    "The answer is 5.",
    '{"name": "sub", "arguments": {}}',  # JSON, but no declared tool: the model's words
    '{"result": 5}',
    '```python\nprint(2 + 3)\n```',
])
def test_plain_replies_are_content(text):
    reply = parse_tool_calls(text, TOOLS)
    assert reply.content == text and not reply.tool_calls and not reply.failures


def test_without_tools_json_is_just_text():
    assert parse_tool_calls('{"name": "add", "arguments": {}}', ()).tool_calls == []


ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                        "b": {"type": "number"}},
                                                       "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def qwen():
    from edge_node.worker import EdgeWorker
    from hera_ray.models import resolve_model

    worker = EdgeWorker(resolve_model("qwen2.5-coder-0.5b").path, "qwen2.5-coder-0.5b", n_ctx=2048)
    yield worker
    worker.close()


def test_the_real_slm_gets_the_tools_in_its_template_and_its_call_parses(qwen):
    import asyncio

    from hera_ray.generation import GenerationParams

    chat = [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]
    p = GenerationParams(chat=json.dumps(chat), tools=json.dumps([ADD]), max_tokens=60)
    prompt = qwen._prompt_text(p)
    assert "<tools>" in prompt and '"name": "add"' in prompt
    reply = parse_tool_calls(asyncio.run(qwen.generate(p)).text, ["add"])
    assert [c["function"]["name"] for c in reply.tool_calls] == ["add"] and args(reply) == {"a": 2, "b": 3}
    # The call and its result go back as the template renders them: the call, then a tool response.
    chat += [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                                  "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    again = qwen._prompt_text(GenerationParams(chat=json.dumps(chat), tools=json.dumps([ADD]), max_tokens=8))
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in again
    assert "<tool_response>\n5\n</tool_response>" in again


@pytest.mark.parametrize("fields, problem", [
    ({"chat": "[]"}, "non-empty JSON array"),
    ({"chat": "{oops"}, "must be JSON"),
    ({"chat": '[{"role": "robot", "content": "x"}]'}, "robot"),
    ({"chat": '[{"role": "user", "content": "x"}]', "tools": '{"a": 1}'}, "tools must be a JSON array"),
    ({"messages": (("user", "x"),), "tools": "[]", "chat": '[{"role": "user", "content": "x"}]'}, "not several"),
    ({"messages": (("user", "x"),), "tools": '[{"type": "function"}]'}, "tools need the conversation as chat"),
])
def test_bad_chat_or_tools_are_refused_by_name(fields, problem):
    from hera_ray.errors import InvalidRequest
    from hera_ray.generation import GenerationParams, validate_params

    with pytest.raises(InvalidRequest, match=problem):
        validate_params(GenerationParams(max_tokens=8, **fields))


def test_chat_and_tools_cross_grpc_unchanged():
    from hera_ray.generation import GenerationParams
    from hera_ray.wire import params_from_pb, params_to_pb

    p = GenerationParams(chat=json.dumps([{"role": "user", "content": "hi"}]), tools=json.dumps([ADD]), max_tokens=8)
    assert params_from_pb(params_to_pb(p)) == p
