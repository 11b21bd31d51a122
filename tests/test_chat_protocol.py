"""The chat-completions request as agent frameworks send it: what is accepted, and what is refused
with a message that names the field (the ingress turns these into 400s). And the contract: the
OpenAPI schema the ingress serves accepts exactly what the ingress does."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from hera_ray.config import AgentConfig
from hera_ray.errors import InvalidRequest
from hera_ray.serve.protocol import (CHAT_COMPLETION_REQUEST, AgentChatCompletionRequest, AgentRunRequest,
                                    StepChatCompletionRequest, check_limits)

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                        "b": {"type": "number"}},
                                                       "required": ["a", "b"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
HI = [{"role": "user", "content": "hi"}]


def request(messages, model="hera-verify", **fields):
    return CHAT_COMPLETION_REQUEST.validate_python({"model": model, "messages": messages, **fields})


def refused(messages, model="hera-verify", **fields) -> str:
    with pytest.raises(ValidationError) as e:
        request(messages, model, **fields)
    err = e.value.errors()[0]
    return ".".join(str(p) for p in err["loc"]) + ": " + err["msg"]


def test_what_langchain_and_the_openai_sdk_send_is_accepted():
    r = request([{"role": "system", "content": "Use the tools."},
                 {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]},
                 {"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "5"}], model="step:hera-verify",
                tools=[ADD], tool_choice="auto", stop=["\n\n"], max_completion_tokens=64, temperature=0, seed=7,
                user="alice", stream=True, stream_options={"include_usage": True}, n=1, parallel_tool_calls=True,
                presence_penalty=0, frequency_penalty=0, logprobs=False, response_format={"type": "text"},
                store=False, metadata={"run": "1"}, service_tier="auto", modalities=["text"], top_logprobs=0)
    assert isinstance(r, StepChatCompletionRequest)
    assert r.question() == "Use the tools.\n\nWhat is 2 + 3?"
    assert r.max_output_tokens() == 64 and r.stop_strings() == ("\n\n",)
    chat = [m.to_chat() for m in r.messages]
    assert chat[2]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}  # an object, as templates read it
    assert chat[3] == {"role": "tool", "content": "5", "tool_call_id": "call_1"}
    agent = request([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                    temperature=0, max_tokens=2.0)  # 2.0 is a JSON integer
    assert isinstance(agent, AgentChatCompletionRequest) and agent.max_tokens == 2
    assert agent.messages[0].to_chat()["role"] == "system"


def test_a_tool_history_that_hangs_together_is_accepted():
    """Parallel calls answered in any order, an id a later turn issues again, and the empty
    arguments some clients send for a call without parameters (``{}``)."""
    other = {**CALL, "id": "call_2", "function": {"name": "add", "arguments": ""}}
    r = request([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL, other]},
                 {"role": "tool", "tool_call_id": "call_2", "content": "0"}, {"role": "tool", "tool_call_id": "call_1", "content": "5"},
                 {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}],
                model="step:all-slm", tools=[ADD])
    chat = [m.to_chat() for m in r.messages]
    assert chat[1]["tool_calls"][1]["function"]["arguments"] == {}
    assert chat[5] == {"role": "tool", "content": "5", "tool_call_id": "call_1"}


ASKED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}]


@pytest.mark.parametrize("messages, fields, named", [
    # a tool message without a matching call
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}], {},
     "messages.1.tool_call_id: 'call_1' answers no call: no assistant message before it has tool_calls"),
    # a tool-call id that was never issued
    (ASKED + [{"role": "tool", "tool_call_id": "call_9", "content": "5"}], {},
     "messages.2.tool_call_id: 'call_9' was never issued by an assistant message before it (calls awaiting an answer: 'call_1')"),
    # a call answered before it is issued: the answer comes first
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}, ASKED[1]],
     {"model": "step:all-slm"}, "messages.1.tool_call_id"),
    # a call answered twice
    (ASKED + [{"role": "tool", "tool_call_id": "call_1", "content": "5"}] * 2, {"model": "step:all-slm"},
     "messages.3.tool_call_id: call 'call_1' (messages.1) was already answered by messages.2"),
    # arguments that are not JSON, or not an object
    ([HI[0], {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "add", "arguments": "{a: 2"}}]}],
     {"model": "step:all-slm"}, "messages.1.tool_calls.0.function.arguments: the arguments of call 'call_1': not JSON"),
    ([HI[0], {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "add", "arguments": "[2, 3]"}}]}],
     {}, "messages.1.tool_calls.0.function.arguments: the arguments of call 'call_1': must be a JSON object, not list"),
    ([HI[0], {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "add", "arguments": '{"a": NaN}'}}]}],
     {}, "messages.1.tool_calls.0.function.arguments: the arguments of call 'call_1': not JSON (NaN is not a JSON value)"),
    ([HI[0], {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "add", "arguments": '{"a": 1e999}'}}]}],
     {}, "messages.1.tool_calls.0.function.arguments: the arguments of call 'call_1': not JSON (1e999 is too large for a double)"),
    ([HI[0], {"role": "assistant", "content": None,
              "tool_calls": [{**CALL, "function": {"name": "add", "arguments": '{"a": ' + "[" * 40 + "]" * 40 + "}"}}]}],
     {}, "messages.1.tool_calls.0.function.arguments: the arguments of call 'call_1': nested deeper than 32 levels"),
    # two tools of one name: the model could not say which it calls
    (HI, {"model": "step:all-slm", "tools": [ADD, ADD]}, "tools.1.function.name: a tool named 'add' is declared twice (tools.0 and tools.1)"),
])
def test_a_tool_history_that_does_not_hang_together_is_refused_at_the_field(messages, fields, named):
    fields = dict(fields)
    said = refused(messages, fields.pop("model", "hera-verify"), **fields)
    assert said.removeprefix("step.").removeprefix("agent.").startswith(named.split(":")[0]), said
    assert named in said.removeprefix("step.").removeprefix("agent."), said


@pytest.mark.parametrize("messages, fields, named", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], {}, "'image_url' part"),
    (HI, {"n": 2}, "n:"),
    (HI, {"logprobs": True}, "logprobs"),
    (HI, {"logprobs": 0}, "logprobs"),  # false only, and 0 is not false
    (HI, {"presence_penalty": 0.5}, "presence_penalty"),
    (HI, {"response_format": {"type": "json_object"}}, "response_format"),
    (HI, {"functions": []}, "functions"),  # an unknown field is named, not ignored
    (HI, {"max_tokens": "5"}, "max_tokens"),  # JSON's types as they are
    (HI, {"max_cloud_cost": False}, "max_cloud_cost"),
    ([], {}, "messages"),  # an empty conversation
    ([{"role": "assistant", "content": "hello"}], {}, "non-empty user"),
    ([{"role": "user", "content": " \n\x1c"}], {}, "non-empty user"),  # blank as str.strip() has it
    ([{"role": "system", "content": "Be brief."}], {}, "non-empty user"),  # hera's own agent answers the user
    ([{"role": "assistant", "content": "hello"}], {"model": "step:all-slm"}, "non-empty user"),
    # what hera's own agent cannot honour (it writes its own chain of thought)
    (HI, {"tools": [ADD]}, "cannot honour tools"),
    (HI, {"tools": []}, "cannot honour tools"),
    (HI, {"stop": ["\n"]}, "cannot honour stop"),
    (HI, {"seed": 1}, "cannot honour seed"),
    (HI, {"tool_choice": "auto"}, "cannot honour tool_choice"),
    # what step mode cannot honour
    (HI, {"model": "step:all-slm", "tool_choice": "required", "tools": [ADD]}, "cannot force a call"),
    (HI, {"model": "step:all-slm", "tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}},
     "cannot force a call"),
    (HI, {"model": "step:all-slm", "max_steps": 3}, "max_steps"),
    (HI, {"model": "step:all-slm", "stop": [""]}, "stop"),
    # a malformed tool schema
    (HI, {"model": "step:all-slm", "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters"),
    (HI, {"model": "step:all-slm", "tools": [{"type": "function", "function": {"name": "add me"}}]}, "tools.0.function.name"),
    # a message's shape by role
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}], {}, "tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "", "content": "5"}], {}, "tool_call_id"),
    ([{"role": "tool"}], {"model": "step:all-slm"}, "content"),  # the empty tool message schemathesis sent
    ([{"role": "user", "content": None}], {}, "content"),
    ([{"role": "user", "content": "hi", "tool_calls": [CALL]}], {}, "tool_calls"),
    ([{"role": "user", "content": "hi", "tool_call_id": "call_1"}], {}, "tool_call_id"),
    ([{"role": "bot", "content": "hi"}], {}, "bot"),
    (HI, {"reasoning_effort": "high"}, "reasoning_effort"),
    (HI, {"modalities": ["text", "audio"]}, "modalities"),
])
def test_what_cannot_be_honoured_is_refused_by_name(messages, fields, named):
    fields = dict(fields)
    assert named in refused(messages, fields.pop("model", "hera-verify"), **fields)


def test_the_cluster_s_limits_are_a_400_naming_the_setting():
    agent = AgentConfig(max_steps_limit=3, max_chain_tokens=256, step_max_tokens_limit=128, temperature=0.0)
    cases = [(request(HI, max_steps=4), "agent.max_steps_limit"), (request(HI, temperature=0.7), "agent.temperature"),
             (request(HI, max_tokens=257), "agent.max_chain_tokens"),
             (request(HI, max_completion_tokens=10, max_tokens=300), "agent.max_chain_tokens"),  # each field, not the one used
             (request(HI, model="step:all-slm", max_tokens=129), "agent.step_max_tokens_limit"),
             (AgentRunRequest(question="hi", max_steps=4), "agent.max_steps_limit")]
    for req, setting in cases:
        with pytest.raises(InvalidRequest) as e:
            check_limits(req, agent)
        assert setting in e.value.message
    check_limits(request(HI, max_steps=3, temperature=0, max_tokens=256), agent)
    check_limits(request(HI, model="step:all-slm", max_tokens=128, temperature=1.5), agent)


# ----------------------------------------------------------------------------------------------------------
# The published schema and the server agree.

AGENT = AgentConfig(max_steps_limit=3, max_chain_tokens=256, step_max_tokens_limit=128, temperature=0.0)

BODIES = [
    {"model": "all-slm", "messages": HI},
    {"model": "all-slm", "messages": [{"role": "tool"}]},
    {"model": "step:all-slm", "messages": [{"role": "tool"}]},
    {"model": "step:all-slm", "messages": [{"role": "tool", "content": "5", "tool_call_id": "call_9"}]},
    {"model": "step:all-slm", "messages": [{"role": "tool", "content": " ", "tool_call_id": "call_9"}]},
    {"model": "all-slm", "messages": [{"role": "tool", "content": "5", "tool_call_id": "call_9"}]},
    {"model": "all-slm", "messages": [{"role": "user", "content": "\x1c\u3000"}]},
    {"model": "all-slm", "messages": [{"role": "user", "content": "\x1b"}]},
    {"model": "all-slm", "messages": [{"role": "user", "content": [{"type": "text", "text": " "}, {"type": "text", "text": "a"}]}]},
    {"model": "all-slm", "messages": [{"role": "user", "content": [{"type": "image_url", "text": "a"}]}]},
    {"model": "all-slm", "messages": [{"role": "user", "content": "hi", "name": None}]},
    {"model": "all-slm", "messages": [{"role": "user", "content": None}]},
    {"model": "all-slm", "messages": [{"role": "assistant", "content": None}, *HI]},
    {"model": "all-slm", "messages": [{"role": "assistant", "content": None, "tool_calls": [CALL]}, *HI]},
    {"model": "all-slm", "messages": [{"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": "no"}, *HI]},
    {"model": "all-slm", "messages": [*HI, {"role": "system", "content": "x", "refusal": None}]},
    {"model": "all-slm", "messages": HI, "tools": None, "tool_choice": "none", "stop": [], "seed": None, "top_p": None},
    {"model": "all-slm", "messages": HI, "tools": []},
    {"model": "all-slm", "messages": HI, "tool_choice": "auto"},
    {"model": "all-slm", "messages": HI, "top_p": 1},
    {"model": "all-slm", "messages": HI, "temperature": 0},
    {"model": "all-slm", "messages": HI, "temperature": 0.5},
    {"model": "all-slm", "messages": HI, "max_steps": 0},
    {"model": "all-slm", "messages": HI, "max_tokens": 0},
    {"model": "all-slm", "messages": HI, "n": 2},
    {"model": "step:all-slm", "messages": HI, "seed": -1},
    {"model": "step:all-slm", "messages": HI, "top_p": 0},
    {"model": "step:all-slm", "messages": HI, "top_p": 5e-324},
    {"model": "all-slm", "messages": HI, "max_steps": 3},
    {"model": "all-slm", "messages": HI, "max_steps": 4},
    {"model": "all-slm", "messages": HI, "max_steps": 3.0},
    {"model": "all-slm", "messages": HI, "max_steps": 2.5},
    {"model": "all-slm", "messages": HI, "max_steps": True},
    {"model": "all-slm", "messages": HI, "max_tokens": 256},
    {"model": "all-slm", "messages": HI, "max_tokens": 257},
    {"model": "all-slm", "messages": HI, "max_completion_tokens": 1, "max_tokens": 300},
    {"model": "all-slm", "messages": HI, "logprobs": 0},
    {"model": "all-slm", "messages": HI, "logprobs": False},
    {"model": "all-slm", "messages": HI, "max_cloud_cost": False},
    {"model": "all-slm", "messages": HI, "max_cloud_cost": 0},
    {"model": "all-slm", "messages": HI, "stream": 1},
    {"model": "all-slm", "messages": HI, "n": 1.0},
    {"model": "all-slm", "messages": HI, "response_format": {}},
    {"model": "all-slm", "messages": HI, "response_format": {"type": "text"}},
    {"model": "all-slm", "messages": HI, "logit_bias": {}},
    {"model": "all-slm", "messages": HI, "logit_bias": {"1": 1}},
    {"model": "step:all-slm", "messages": HI, "tools": [ADD, ADD], "tool_choice": "auto", "stop": "x", "seed": 7, "top_p": 1},
    {"model": "step:all-slm", "messages": HI, "tool_choice": "required"},
    {"model": "step:all-slm", "messages": HI, "stop": ""},
    {"model": "step:all-slm", "messages": HI, "stop": ["a"] * 17},
    {"model": "step:all-slm", "messages": HI, "max_steps": None},
    {"model": "step:all-slm", "messages": HI, "max_steps": 1},
    {"model": "step:all-slm", "messages": HI, "max_tokens": 128, "temperature": 2},
    {"model": "step:all-slm", "messages": HI, "max_tokens": 129},
    {"model": "step:all-slm", "messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
    {"model": "step:all-slm", "messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": "not json"}}]}]},
    {"model": "step:all-slm", "messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                           {"role": "tool", "content": "5", "tool_call_id": "call_1"}]},
    {"model": "step:all-slm", "messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                           *[{"role": "tool", "content": "5", "tool_call_id": "call_1"}] * 2]},
    {"model": "step:all-slm", "messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": '{"a": ' + "[" * 40 + "]" * 40 + "}"}}]}]},
    {"model": "step:all-slm", "messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": '{"a": 1e999, "b": 1.5}'}}]}]},
    {"model": "step:all-slm", "messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": '{"a": 1.5e300}'}}]}]},
    {"model": "step:", "messages": HI},
    {"model": "step", "messages": HI},
    {"model": "", "messages": HI},
    {"model": "all-slm", "messages": []},
]


@pytest.fixture(scope="module")
def published():
    from hera_ray.serve.openai_api import published_openapi

    return published_openapi(agent=AGENT, keys_required=True)


def _schema_accepts(doc: dict, path: str, body) -> bool:
    from jsonschema import Draft202012Validator, FormatChecker

    schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    root = {**schema, "components": doc["components"]}
    validator = Draft202012Validator(root, format_checker=FormatChecker())
    return validator.is_valid(json.loads(json.dumps(body)))


def _server_accepts(adapter, body) -> bool:
    try:
        check_limits(adapter.validate_python(body), AGENT)
    except (ValidationError, InvalidRequest):
        return False
    return True


def _hangs_together(body) -> bool:
    """What the schema states only in words (a tool message answers an issued call, arguments are a
    JSON object, no two tools of one name), judged by the schemathesis hook's own reading of them:
    a body it would leave as it is."""
    from schemathesis_hooks import mend_conversation

    return mend_conversation(copy.deepcopy(body)) == body


@pytest.mark.parametrize("body", BODIES, ids=lambda b: json.dumps(b)[:80])
def test_the_chat_schema_accepts_what_the_server_accepts(published, body):
    """The server accepts what the schema does, and refuses of that only what the schema's words rule out."""
    expected = _schema_accepts(published, "/v1/chat/completions", body) and _hangs_together(body)
    assert expected == _server_accepts(CHAT_COMPLETION_REQUEST, body)


def test_the_schema_states_in_words_what_it_cannot_state_as_rules(published):
    schemas = published["components"]["schemas"]
    assert "issued" in schemas["ToolMessage"]["properties"]["tool_call_id"]["description"]
    arguments = schemas["ToolCallFunction"]["properties"]["arguments"]
    assert arguments["contentMediaType"] == "application/json" and arguments["contentSchema"] == {"type": "object"}
    assert "no two may share" in schemas["StepChatCompletionRequest"]["properties"]["tools"]["description"]


@pytest.mark.parametrize("body", [
    {"question": "hi"}, {"question": " \t"}, {"question": ""}, {"question": "\x1c"}, {"question": "hi", "max_steps": 3},
    {"question": "hi", "max_steps": 4}, {"question": "hi", "max_steps": 0}, {"question": "hi", "max_steps": 2.0}, {"question": "hi", "max_cloud_cost": False},
    {"question": "hi", "policy": "step:all-slm"}, {"question": "hi", "policy": "hera@0.3"}, {"question": 5},
    {"question": "hi", "extra": 1},
], ids=json.dumps)
def test_the_agent_run_schema_accepts_what_the_server_accepts(published, body):
    from pydantic import TypeAdapter

    assert _schema_accepts(published, "/v1/agent/runs", body) == _server_accepts(TypeAdapter(AgentRunRequest), body)


def test_the_published_schema_declares_the_errors_the_server_answers(published):
    for path, item in published["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            assert "422" not in codes, (method, path)  # invalid input is a 400
            if path != "/healthz":  # every keyed route: a bad key, its rate limit; with input, a bad request
                assert {"401", "429"} <= codes and operation["security"] == [{"ApiKey": []}], (method, path)
                if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
                    assert "400" in codes, (method, path)
            for code, response in operation["responses"].items():
                if code != "200":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (method, path, code)
    assert "HTTPValidationError" not in published["components"]["schemas"]
    assert published["components"]["schemas"]["AgentChatCompletionRequest"]["properties"]["max_steps"]["anyOf"][0]["maximum"] == 3
