"""Request and response models of the HTTP API (OpenAI's chat shape plus hera's agent runs)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


#: OpenAI's rule for a function name.
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
#: Deepest JSON accepted in tool-call arguments and tool schemas.
MAX_JSON_DEPTH = 32


def _depth(value: Any, level: int = 0) -> int:
    """How deep ``value`` nests (stops counting past MAX_JSON_DEPTH)."""
    if level > MAX_JSON_DEPTH or not isinstance(value, (dict, list)):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in items), default=level + 1)


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=TOOL_NAME)
    #: A JSON object, as a string (OpenAI's wire format).
    arguments: str = Field(..., max_length=200_000)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            value = json.loads(v) if v.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments must be a JSON object, and this is not JSON ({e.msg} at character {e.pos})") from None
        except (RecursionError, ValueError) as e:
            raise ValueError(f"arguments cannot be read: {str(e)[:100] or 'nested too deeply'}") from None
        if not isinstance(value, dict):
            raise ValueError(f"arguments must be a JSON object, not {type(value).__name__}")
        if _depth(value) > MAX_JSON_DEPTH:
            raise ValueError(f"arguments are nested deeper than {MAX_JSON_DEPTH} levels")
        return v


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One message of the conversation, as OpenAI's API and the agent frameworks on it send it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    #: A string, a list of text parts ({"type": "text", "text": ...}), or null (an assistant
    #: message that only calls tools). Other parts (images, audio, files) are refused by name.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, max_length=200)
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=200)
    refusal: str | None = None
    #: An earlier assistant turn's audio reference: accepted in the history, not sent to the models (text only).
    audio: dict[str, Any] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content[{i}] is a {kind!r} part: only text parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"content[{i}].text must be a string")
                extra = set(part) - {"type", "text"}
                if extra:
                    raise ValueError(f"content[{i}] has field(s) {sorted(extra)} this server cannot honour")
        if isinstance(v, str) and len(v) > 200_000:
            raise ValueError("content is longer than 200000 characters")
        return v

    @model_validator(mode="after")
    def _shape_by_role(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls: only an assistant message calls tools, not a {self.role} message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message must name the call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id: only a tool message answers a call, not a {self.role} message")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: null is allowed only on an assistant message, not a {self.role} message")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)

    def to_chat(self) -> dict[str, Any]:
        """The message as a chat template reads it: text content, tool calls with their arguments as objects."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": json.loads(c.function.arguments or "{}")}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = Field(None, max_length=10_000)
    #: A JSON Schema of the arguments (an object schema).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _a_json_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if _depth(v) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(v)
        except SchemaError as e:
            where = "/".join(str(p) for p in e.path) or "the schema"
            raise ValueError(f"not a valid JSON Schema at {where}: {e.message[:300]}") from None
        except (RecursionError, TypeError, ValueError) as e:  # pathological input: still the caller's error
            raise ValueError(f"not a valid JSON Schema: {str(e)[:300]}") from None
        if v.get("type", "object") != "object":
            raise ValueError(f"must describe an object (type \"object\"), not {v.get('type')!r}")
        return v


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class _Name(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(..., pattern=TOOL_NAME)

    type: Literal["function"]
    function: _Name


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    #: OpenAI pads chunks against side channels when this is true; these chunks carry no padding either way.
    include_obfuscation: bool | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI ``/v1/chat/completions``. ``model`` names the routing policy (``hera``, ``all-llm``, ...).

    Every field OpenAI's API and the agent frameworks on it send is either honoured or, when this
    server cannot honour its value, refused with a 400 that names it: an unknown field, ``n`` above
    1, penalties, ``logit_bias``, ``logprobs``, a ``response_format`` other than text."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=200, examples=["all-slm", "hera", "step:all-slm"])
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000,
                                        examples=[[{"role": "user", "content": "What is 2 + 3?"}]])
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    user: str | None = Field(None, max_length=256)
    # Accepted only at the value that changes nothing (what clients send by default).
    n: int | None = Field(None, ge=1, le=1, description="Choices per request: 1 only.")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="0 only.")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="0 only.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Empty only.")
    logprobs: bool | None = Field(None, description="false only.")
    response_format: dict[str, Any] | None = Field(None, description="{\"type\": \"text\"} only.")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="0 only.")
    modalities: list[Literal["text"]] | None = Field(None, description="[\"text\"] only.")
    reasoning_effort: None = Field(None, description="Not supported: the models here do not reason apart.")
    # About the provider's storage and billing, not the reply: accepted, and nothing is stored.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(None, max_length=100)
    prompt_cache_key: str | None = Field(None, max_length=1000)
    safety_identifier: str | None = Field(None, max_length=1000)
    # hera's own.
    max_steps: int | None = Field(None, ge=1, le=100, description="hera: steps at most (each a line of the chain of thought).")
    # allow_inf_nan: Python's JSON parser takes Infinity, which would pass ge=0 and then fail the reply.
    max_cloud_cost: float | None = Field(None, ge=0, allow_inf_nan=False, description="hera: cap on this request's cloud spend.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("this server does not return logprobs; send false or leave it out")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v != {"type": "text"}:
            raise ValueError(f"only {{\"type\": \"text\"}} is supported, not {json.dumps(v)[:200]}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop takes at most 16 non-empty strings")
        return v

    @model_validator(mode="after")
    def _conversation(self) -> "ChatCompletionRequest":
        if not any(m.role in ("user", "system", "developer", "tool") and m.text().strip() for m in self.messages):
            raise ValueError("messages: the conversation has no non-empty user, system or tool message")
        issued: dict[str, int] = {}
        answered: set[str] = set()
        for i, m in enumerate(self.messages):
            for c in m.tool_calls or ():
                if c.id in issued:
                    raise ValueError(f"messages[{i}].tool_calls: id {c.id!r} was already issued in messages[{issued[c.id]}]")
                issued[c.id] = i
            if m.role == "tool":
                if m.tool_call_id not in issued:
                    raise ValueError(f"messages[{i}].tool_call_id: {m.tool_call_id!r} answers no tool call issued "
                                     "before it in the conversation")
                if m.tool_call_id in answered:
                    raise ValueError(f"messages[{i}].tool_call_id: call {m.tool_call_id!r} is already answered")
                answered.add(m.tool_call_id)
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: {self.tool_choice.function.name!r} is not one of the tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice: \"required\" needs tools")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def question(self) -> str:
        """hera's own agent: the task, as the user messages with any system message as context before them."""
        parts = [m.text().strip() for m in self.messages if m.role in ("system", "developer", "user") and m.text().strip()]
        return "\n\n".join(parts)


class AgentRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., min_length=1, max_length=200_000, examples=["What is 2 + 3?"])
    policy: str = Field("all-slm", min_length=1, max_length=200, description="Routing policy.")
    max_steps: int | None = Field(None, ge=1, le=100)
    max_cloud_cost: float | None = Field(None, ge=0, allow_inf_nan=False)
    request_id: str | None = Field(None, max_length=200)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question must not be blank")
        return v


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: Any = None) -> dict:
    """OpenAI's error shape, so OpenAI SDKs raise a readable error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
