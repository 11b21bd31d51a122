"""Real agent frameworks, unchanged, against the live cluster in step mode (model step:<policy>):
the official openai SDK, LangChain's ChatOpenAI, and pydantic-ai's Agent.

The bundled models are coder models, weak at tool use: the 0.5B SLM writes a correct first call
but loops on calls after a tool result; the 1.5B LLM answers from the result when the system
prompt tells it to (measured in bench/agent_dropin.py). The agent loops here run on
``step:all-llm`` for that reason, and the SLM's calls are checked on the first turn.
"""

from __future__ import annotations

import json

import pytest

from dropin_settings import API_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SYSTEM = ("You are a helpful assistant. Use a tool to compute; once a <tool_response> gives you the result, "
          "reply to the user with the final answer and do not call any tool again.")
MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers and return the product.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


@pytest.fixture
def oai(base_url):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)


def test_openai_sdk_chat_stream_and_tools(oai):
    reply = oai.chat.completions.create(model="step:all-slm", max_tokens=16,
                                        messages=[{"role": "user", "content": "Say hello in one word."}])
    assert reply.choices[0].message.content and reply.model_extra["hera"]["placement"] == "edge"
    chunks = list(oai.chat.completions.create(model="step:all-llm", max_tokens=16, stream=True,
                                              stream_options={"include_usage": True},
                                              messages=[{"role": "user", "content": "Say hello in one word."}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens > 0
    # Tools: the SLM's call comes back as OpenAI tool_calls, with the arguments as a JSON string.
    call = oai.chat.completions.create(model="step:all-slm", tools=[MULTIPLY],
                                       messages=[{"role": "user", "content": "What is 17 times 23?"}])
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tc,) = choice.message.tool_calls
    assert tc.function.name == "multiply" and json.loads(tc.function.arguments) == {"a": 17, "b": 23}
    assert call.model_extra["hera"]["tool_parse_failures"] == []
    # Streamed tool calls assemble as the SDK assembles OpenAI's.
    stream = list(oai.chat.completions.create(model="step:all-slm", tools=[MULTIPLY], stream=True,
                                              messages=[{"role": "user", "content": "What is 17 times 23?"}]))
    args = "".join(d.function.arguments or "" for c in stream if c.choices for d in c.choices[0].delta.tool_calls or ())
    assert json.loads(args) == {"a": 17, "b": 23} and stream[-1].choices[0].finish_reason == "tool_calls"


def test_openai_sdk_agent_loop_runs_the_tool_and_answers(oai):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 17 times 23?"}]
    for _ in range(4):
        reply = oai.chat.completions.create(model="step:all-llm", tools=[MULTIPLY], messages=messages).choices[0]
        if not reply.message.tool_calls:
            break
        messages.append(reply.message.model_dump(exclude_none=True))
        for tc in reply.message.tool_calls:
            a = json.loads(tc.function.arguments)
            messages.append({"role": "tool", "tool_call_id": tc.id, "content": str(a["a"] * a["b"])})
    assert "391" in (reply.message.content or "")
    assert any(m["role"] == "tool" for m in messages)


def test_langchain_invoke_stream_bind_tools_and_a_tool_calling_loop(base_url):
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        return a * b

    slm = ChatOpenAI(base_url=base_url, api_key=API_KEY, model="step:all-slm", temperature=0, max_retries=0)
    said = slm.invoke("Say hello in one word.")
    assert said.content and said.response_metadata.get("finish_reason") in ("stop", "length")
    assert "".join(chunk.content for chunk in slm.stream("Say hello in one word.")).strip()
    called = slm.bind_tools([multiply]).invoke("What is 17 times 23?")
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("multiply", {"a": 17, "b": 23})]
    streamed = None
    for chunk in slm.bind_tools([multiply]).stream("What is 17 times 23?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("multiply", {"a": 17, "b": 23})]
    # The agent loop: the model calls the Python tool, gets its result, and answers.
    llm = ChatOpenAI(base_url=base_url, api_key=API_KEY, model="step:all-llm", temperature=0, max_retries=0)
    agent = llm.bind_tools([multiply])
    messages = [SystemMessage(SYSTEM), HumanMessage("What is 17 times 23?")]
    ran = []
    for _ in range(4):
        reply = agent.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            result = multiply.invoke(call["args"])
            ran.append(result)
            messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
    assert ran == [391] and "391" in reply.content
    assert reply.response_metadata["finish_reason"] == "stop"


def test_pydantic_ai_agent_with_a_tool(base_url):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("step:all-llm", provider=OpenAIProvider(base_url=base_url, api_key=API_KEY))
    agent = Agent(model, system_prompt=SYSTEM, model_settings={"temperature": 0})
    ran = []

    @agent.tool_plain
    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        ran.append((a, b))
        return a * b

    result = agent.run_sync("What is 17 times 23?")
    assert ran == [(17, 23)] and "391" in str(result.output)
