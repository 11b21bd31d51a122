"""Request and response models of the HTTP API (OpenAI's chat shape plus hera's agent runs).

These models are the API's contract: the ingress validates every body with them, and its OpenAPI
schema is their JSON Schema. So each rule within one field is a type or a constraint the schema can
state (a pattern, a bound, a ``const``, a role-tagged message shape), and a field validator only
words the refusal of something the type refuses anyway (``"'image_url' part: only text parts are
supported"`` instead of a type error). The rules across fields, which JSON Schema cannot state, are
checked by :func:`check_tool_history` and written in the schema's descriptions: a ``tool`` message
answers a call an assistant message issued before it and not yet answered, tool-call arguments are
a JSON object, and no two tools share a name; each refusal names the message and field
(``messages.3.tool_call_id``). The limits a cluster sets (``agent.max_steps_limit``, the token caps, the agent's
temperature) are checked by :func:`check_limits` and stated in the served schema by
:func:`publish_limits`, from the same numbers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from hera_ray.errors import InvalidRequest

#: OpenAI's rule for a function name.
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
#: Deepest JSON accepted in tool schemas (and read as an object in tool-call arguments).
MAX_JSON_DEPTH = 32
#: A model name that selects step mode (``step:<policy>``); any other runs hera's own agent.
STEP_PREFIX = "step:"
#: Not blank: some character Python's ``str.isspace`` does not count (the class spelled out, so that
#: the server's ``re``, pydantic's Rust regex and a client's ECMA regex read it alike).
NONBLANK = r"[^\t-\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_NONBLANK = re.compile(NONBLANK)
#: A model name that does not start with ``step:`` (without a lookahead, which not every regex engine has).
AGENT_MODEL = r"^(?:[^s]|s(?:[^t]|$)|st(?:[^e]|$)|ste(?:[^p]|$)|step(?:[^:]|$))"
STEP_MODEL = r"^step:"

# Strict: JSON's types as they are (no "1" for 1, no 0 for false, no true for 1.0).
_STRICT = ConfigDict(extra="forbid", strict=True)


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _int(ge: int, le: int) -> Any:
    """A JSON Schema integer in [ge, le]: 2.0 is one too (a float with no fraction), true is not. (The
    bounds go inside, next to the type: on the outside pydantic would not write them into the schema.)"""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


_Tokens = _int(1, 32_768)
_Steps = _int(1, 100)


def nonblank(text: str) -> bool:
    return _NONBLANK.search(text) is not None


def _depth(value: Any, level: int = 0) -> int:
    """How deep ``value`` nests (stops counting past MAX_JSON_DEPTH)."""
    if level > MAX_JSON_DEPTH or not isinstance(value, (dict, list)):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in items), default=level + 1)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _finite(number: str) -> float:
    if math.isinf(value := float(number)):  # 1e999: JSON, but no template or client writes it back as JSON
        raise ValueError(f"{number[:40]} is too large for a double")
    return value


class ToolCallFunction(BaseModel):
    model_config = _STRICT

    name: str = Field(..., pattern=TOOL_NAME)
    #: OpenAI's wire format: the arguments as a JSON string, which must hold a JSON object (an empty
    #: string stands for ``{}``); it reaches the chat template as that object (:func:`check_tool_history`).
    arguments: str = Field(..., json_schema_extra={
        "contentMediaType": "application/json", "contentSchema": {"type": "object"},
        "description": "A JSON object, as a string (an empty string stands for {})."})

    def _read(self) -> tuple[Any, str | None]:
        """(the arguments as a value, None), or (None, why they are not a JSON object this server passes on)."""
        if not self.arguments.strip():
            return {}, None
        try:
            value = json.loads(self.arguments, parse_constant=_not_json, parse_float=_finite)
        except RecursionError:
            return None, f"nested deeper than {MAX_JSON_DEPTH} levels"
        except ValueError as e:
            return None, f"not JSON ({e})"
        if not isinstance(value, dict):
            return None, f"must be a JSON object, not {type(value).__name__ if value is not None else 'null'}"
        if _depth(value) > MAX_JSON_DEPTH:
            return None, f"nested deeper than {MAX_JSON_DEPTH} levels"
        return value, None

    def arguments_problem(self) -> str | None:
        """Why the arguments are not a JSON object this server passes on, or None when they are one."""
        return self._read()[1]

    def parsed_arguments(self) -> dict[str, Any] | str:
        """The arguments as an object. A validated request's are one (:func:`check_tool_history`); the
        string comes back only for a call built without that check."""
        value, problem = self._read()
        return self.arguments if problem is not None else value


class ToolCall(BaseModel):
    model_config = _STRICT

    id: str = Field(..., min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(BaseModel):
    """A content part: text is the only kind these models read."""

    model_config = _STRICT

    type: Literal["text"]
    text: str


#: A message's content: a string or a list of text parts. Their size is bounded by the request's (the
#: ingress's body limit, a 413) and the model's context window (a 400), not field by field.
Content = Union[str, list[TextPart]]


def _only_text_parts(v: Any) -> Any:
    """Names what the content type refuses in a list of parts (images, audio, files, unknown fields)."""
    if isinstance(v, list):
        for i, part in enumerate(v):
            if not isinstance(part, dict):
                continue  # the type's own error says what it is
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"content[{i}] is a {kind!r} part: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content[{i}].text must be a string")
            extra = set(part) - {"type", "text"}
            if extra:
                raise ValueError(f"content[{i}] has field(s) {sorted(extra)} this server cannot honour")
    return v


class ChatMessage(BaseModel):
    """What every message has: its role and, optionally, a participant's name. The role decides the
    rest (:data:`Message`): a tool message answers a call by its id, only an assistant message
    calls tools or has no content."""

    model_config = _STRICT

    name: str | None = Field(None, max_length=200)

    @field_validator("content", mode="before", check_fields=False)  # each role's class declares its content
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        return _only_text_parts(v)

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text for part in content)

    def calls(self) -> list[ToolCall]:
        return []

    def to_chat(self) -> dict[str, Any]:
        """The message as a chat template reads it: text content, tool calls with their arguments as objects."""
        role = getattr(self, "role")
        return {"role": "system" if role == "developer" else role, "content": self.text()}


class _Authored(ChatMessage):
    content: Content


class SystemMessage(_Authored):
    role: Literal["system"]


class DeveloperMessage(_Authored):
    role: Literal["developer"]


class UserMessage(_Authored):
    role: Literal["user"]


class AssistantMessage(ChatMessage):
    role: Literal["assistant"]
    #: null when the message only calls tools.
    content: Content | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)
    refusal: str | None = None
    #: An earlier turn's audio reference: accepted in the history, not sent to the models (text only).
    audio: dict[str, Any] | None = None

    def calls(self) -> list[ToolCall]:
        return self.tool_calls or []

    def to_chat(self) -> dict[str, Any]:
        out = super().to_chat()
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.parsed_arguments()}}
                                 for c in self.tool_calls]
        return out


class ToolMessage(_Authored):
    role: Literal["tool"]
    #: The call it answers: one an assistant message before it issued and no tool message has answered yet.
    tool_call_id: str = Field(..., min_length=1, max_length=200,
                              description="The id of a call an assistant message before this one issued (tool_calls[].id) "
                                          "and no tool message has answered yet.")

    def to_chat(self) -> dict[str, Any]:
        out = {**super().to_chat(), "tool_call_id": self.tool_call_id}
        if self.name is not None:
            out["name"] = self.name
        return out


#: One message of the conversation, as OpenAI's API and the agent frameworks on it send it, by role.
Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage],
                    Field(discriminator="role")]


def _said(roles: tuple[str, ...]) -> dict[str, Any]:
    """JSON Schema of a message of one of ``roles`` whose text is not blank."""
    return {"type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": list(roles)},
                           "content": {"anyOf": [{"type": "string", "pattern": NONBLANK},
                                                 {"type": "array", "contains": {
                                                     "type": "object", "required": ["text"],
                                                     "properties": {"text": {"type": "string", "pattern": NONBLANK}}}}]}}}


class FunctionSpec(BaseModel):
    model_config = _STRICT

    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = None
    #: A JSON Schema of the arguments (an object schema), checked against JSON Schema 2020-12's metaschema.
    parameters: dict[str, Any] | None = Field(None, json_schema_extra={
        "description": "A JSON Schema (2020-12) of the arguments, describing an object.",
        "properties": {"type": {"const": "object"}}})
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
    model_config = _STRICT

    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    #: OpenAI pads chunks against side channels when this is true; these chunks carry no padding either way.
    include_obfuscation: bool | None = None


class ResponseFormatText(BaseModel):
    model_config = _STRICT

    type: Literal["text"]




def _refusal(kind: str, loc: tuple, value: Any, message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)


def tool_history_problems(messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> list[InitErrorDetails]:
    """What JSON Schema cannot state about a conversation and its tools, each at the field at fault:

    - a ``tool`` message answers a call an assistant message before it issued (``tool_calls[].id``)
      and no tool message has answered since (an id issued again may be answered again);
    - tool-call arguments are a JSON object (an empty string stands for ``{}``);
    - no two tools share a name (the model could not say which it calls).
    """
    problems: list[InitErrorDetails] = []
    open_calls: dict[str, int] = {}  # id -> calls issued and not yet answered
    issued_at: dict[str, int] = {}  # id -> the message that last issued it
    answered_at: dict[str, int] = {}  # id -> the message that last answered it
    for i, m in enumerate(messages):
        for j, call in enumerate(m.calls()):
            if (why := call.function.arguments_problem()) is not None:
                problems.append(_refusal("tool_call_arguments", ("messages", i, "tool_calls", j, "function", "arguments"),
                                         call.function.arguments, f"the arguments of call {call.id!r}: {why}"))
            open_calls[call.id] = open_calls.get(call.id, 0) + 1
            issued_at[call.id] = i
        if isinstance(m, ToolMessage):
            cid = m.tool_call_id
            if open_calls.get(cid, 0) > 0:
                open_calls[cid] -= 1
                answered_at[cid] = i
                continue
            if cid in answered_at:
                why = f"call {cid!r} (messages.{issued_at[cid]}) was already answered by messages.{answered_at[cid]}"
            elif not issued_at:
                why = f"{cid!r} answers no call: no assistant message before it has tool_calls"
            else:
                waiting = [c for c, n in open_calls.items() if n > 0]
                why = (f"{cid!r} was never issued by an assistant message before it (calls awaiting an answer: "
                       f"{', '.join(map(repr, waiting[:8])) or 'none'})")
            problems.append(_refusal("tool_call_id", ("messages", i, "tool_call_id"), cid, why))
    first: dict[str, int] = {}
    for k, tool in enumerate(tools or []):
        name = tool.function.name
        if name in first:
            problems.append(_refusal("tool_name", ("tools", k, "function", "name"), name,
                                     f"a tool named {name!r} is declared twice (tools.{first[name]} and tools.{k})"))
        first.setdefault(name, k)
    return problems


def check_tool_history(request: BaseModel) -> None:
    """Raise a ValidationError at the first field :func:`tool_history_problems` finds at fault."""
    problems = tool_history_problems(request.messages, getattr(request, "tools", None))
    if problems:
        raise ValidationError.from_exception_data(type(request).__name__, problems[:1])


class _ChatCompletion(BaseModel):
    """What both kinds of chat completion take (:data:`ChatCompletionRequest`)."""

    model_config = _STRICT

    # model and messages: each kind says which model names and conversations it takes.
    stream: bool = False
    stream_options: StreamOptions | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: _Tokens | None = None
    max_completion_tokens: _Tokens | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    user: str | None = Field(None, max_length=256)
    # Accepted only at the value that changes nothing (what clients send by default).
    n: _int(1, 1) | None = Field(None, description="Choices per request: 1 only.")
    frequency_penalty: float | None = Field(None, ge=0, le=0, allow_inf_nan=False, description="0 only.")
    presence_penalty: float | None = Field(None, ge=0, le=0, allow_inf_nan=False, description="0 only.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Empty only.")
    logprobs: Literal[False] | None = Field(None, description="false only.")
    response_format: ResponseFormatText | None = Field(None, description="{\"type\": \"text\"} only.")
    top_logprobs: _int(0, 0) | None = Field(None, description="0 only.")
    modalities: list[Literal["text"]] | None = Field(None, description="[\"text\"] only.")
    reasoning_effort: None = Field(None, description="Not supported: the models here do not reason apart.")
    # About the provider's storage and billing, not the reply: accepted, and nothing is stored.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = Field(None, max_length=100)
    prompt_cache_key: str | None = Field(None, max_length=1000)
    safety_identifier: str | None = Field(None, max_length=1000)
    # allow_inf_nan: Python's JSON parser takes Infinity, which would pass ge=0 and then fail the reply.
    max_cloud_cost: float | None = Field(None, ge=0, allow_inf_nan=False, description="hera: cap on this request's cloud spend.")

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v is True:
            raise ValueError("this server does not return logprobs; send false or leave it out")
        if v is not None and v is not False:  # Literal[False] alone takes 0, which equals False
            raise ValueError("logprobs must be false (or left out)")
        return v

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is not None and v != {"type": "text"}:
            raise ValueError(f"only {{\"type\": \"text\"}} is supported, not {json.dumps(v)[:200]}")
        return v

    @model_validator(mode="after")
    def _tool_history(self) -> "_ChatCompletion":
        check_tool_history(self)
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stop = getattr(self, "stop", None)
        return (stop,) if isinstance(stop, str) else tuple(stop or ())

    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def question(self) -> str:
        """hera's own agent: the task, as the user messages with any system message as context before them."""
        parts = [m.text().strip() for m in self.messages if m.role in ("system", "developer", "user") and m.text().strip()]
        return "\n\n".join(parts)


def _conversation(messages: list[ChatMessage], roles: tuple[str, ...], problem: str) -> list[ChatMessage]:
    if not any(m.role in roles and nonblank(m.text()) for m in messages):
        raise ValueError(problem)
    return messages


_AGENT_ROLES, _STEP_ROLES = ("user",), ("user", "system", "developer", "tool")


class AgentChatCompletionRequest(_ChatCompletion):
    """A model named after a routing policy (``hera``, ``all-llm``, ``random@0.3``...): hera's own
    agent answers the user's question with its chain of thought, at the cluster's temperature. It
    writes that chain itself, so tools, stop strings, a seed and top_p are not for it."""

    model: str = Field(..., min_length=1, max_length=200, pattern=AGENT_MODEL, examples=["all-slm", "hera"],
                       description="A routing policy (GET /v1/models), optionally <policy>@<value>.")
    messages: list[Message] = Field(..., min_length=1, max_length=1000, json_schema_extra={"contains": _said(_AGENT_ROLES)},
                                    examples=[[{"role": "user", "content": "What is 2 + 3?"}]],
                                    description="At least one user message that is not blank.")
    tools: None = None
    tool_choice: Literal["none"] | None = None
    stop: Annotated[list[str], Field(max_length=0)] | None = None
    seed: None = None
    top_p: None = None
    max_steps: _Steps | None = Field(None, description="hera: steps at most (each a line of the chain of thought).")

    @field_validator("tools", "tool_choice", "stop", "seed", "top_p", mode="before")
    @classmethod
    def _not_for_the_agent(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or (info.field_name == "tool_choice" and v == "none") or (info.field_name == "stop" and v == []):
            return v
        model = info.data.get("model", "")
        raise ValueError(f"{info.field_name}: model {model!r} runs hera's own agent, which writes its chain of thought "
                         f"itself and cannot honour {info.field_name}")

    @field_validator("messages")
    @classmethod
    def _a_question(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        return _conversation(v, _AGENT_ROLES, "hera's own agent needs a non-empty user message to answer")


class StepChatCompletionRequest(_ChatCompletion):
    """``step:<policy>``: the call is one subtask of the caller's own agent (:mod:`hera_ray.serve.step_mode`),
    answered by the model the policy places it on, tools and all."""

    model: str = Field(..., min_length=1, max_length=200, pattern=STEP_MODEL, examples=["step:all-slm"],
                       description="step:<policy> (GET /v1/models).")
    messages: list[Message] = Field(..., min_length=1, max_length=1000, json_schema_extra={"contains": _said(_STEP_ROLES)},
                                    examples=[[{"role": "user", "content": "What is 2 + 3?"}]],
                                    description="At least one user, system, developer or tool message that is not blank.")
    tools: list[ToolSpec] | None = Field(None, max_length=128,
                                         description="The tools the model may call; no two may share a function name.")
    #: The model chooses whether to call a tool: step mode cannot force one.
    tool_choice: Literal["none", "auto"] | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    seed: _int(0, 2**32 - 1) | None = None
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_steps: None = Field(None, description="Not for step mode: it runs one call.")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _no_forced_call(cls, v: Any) -> Any:
        if v == "required" or isinstance(v, dict):
            raise ValueError("step mode lets the model choose (\"auto\") or not call tools (\"none\"); it cannot force a call")
        return v

    @field_validator("max_steps", mode="before")
    @classmethod
    def _one_call(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("step mode runs one call; max_steps is for hera's own agent")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else v if isinstance(v, list) else []
        if len(stops) > 16 or any(s == "" for s in stops):
            raise ValueError("stop takes at most 16 non-empty strings")
        return v

    @field_validator("messages")
    @classmethod
    def _something_said(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        return _conversation(v, _STEP_ROLES, "the conversation has no non-empty user, system, developer or tool message")


def _chat_kind(v: Any) -> str:
    model = v.get("model") if isinstance(v, dict) else getattr(v, "model", None)
    return "step" if isinstance(model, str) and model.startswith(STEP_PREFIX) else "agent"


#: OpenAI ``/v1/chat/completions``: the model name picks the kind. Every field OpenAI's API and the
#: agent frameworks on it send is either honoured or, when this server cannot honour its value,
#: refused with a 400 that names it: an unknown field, ``n`` above 1, penalties, ``logit_bias``,
#: ``logprobs``, a ``response_format`` other than text.
ChatCompletionRequest = Annotated[Union[Annotated[AgentChatCompletionRequest, Tag("agent")],
                                        Annotated[StepChatCompletionRequest, Tag("step")]],
                                  Discriminator(_chat_kind)]
CHAT_COMPLETION_REQUEST: TypeAdapter = TypeAdapter(ChatCompletionRequest)
#: The union's tags, which pydantic puts in an error's location (the ingress leaves them out).
CHAT_KINDS = ("agent", "step")


class AgentRunRequest(BaseModel):
    model_config = _STRICT

    question: str = Field(..., min_length=1, max_length=200_000, pattern=NONBLANK, examples=["What is 2 + 3?"],
                          description="Not blank.")
    policy: str = Field("all-slm", min_length=1, max_length=200, pattern=AGENT_MODEL,
                        description="Routing policy (GET /v1/models), optionally <policy>@<value>.")
    max_steps: _Steps | None = None
    max_cloud_cost: float | None = Field(None, ge=0, allow_inf_nan=False)
    request_id: str | None = Field(None, max_length=200)

    @field_validator("question", mode="before")
    @classmethod
    def _not_blank(cls, v: Any) -> Any:
        if isinstance(v, str) and v and not nonblank(v):
            raise ValueError("question must not be blank")
        return v

    @field_validator("policy", mode="before")
    @classmethod
    def _not_step_mode(cls, v: Any) -> Any:
        if isinstance(v, str) and v.startswith(STEP_PREFIX):
            raise ValueError(f"{v!r} is a step-mode model, for /v1/chat/completions; an agent run takes a routing policy")
        return v


def check_limits(req: BaseModel, agent: Any) -> None:
    """The cluster's own limits (``agent`` is its AgentConfig), as a 400 naming the setting. The
    served schema states the same bounds (:func:`publish_limits`)."""
    if isinstance(req, (AgentChatCompletionRequest, AgentRunRequest)):
        if req.max_steps is not None and req.max_steps > agent.max_steps_limit:
            raise InvalidRequest(f"max_steps {req.max_steps} exceeds this server's limit of {agent.max_steps_limit} "
                                 "(agent.max_steps_limit)", param="max_steps")
    if isinstance(req, AgentChatCompletionRequest):
        if req.temperature is not None and req.temperature != agent.temperature:
            raise InvalidRequest(f"temperature: hera's own agent runs at the cluster's temperature, {agent.temperature:g} "
                                 f"(agent.temperature); got {req.temperature:g}", param="temperature")
        caps = (agent.max_chain_tokens, "this server's chain cap of {} tokens (agent.max_chain_tokens)")
    elif isinstance(req, StepChatCompletionRequest):
        caps = (agent.step_max_tokens_limit, "this server's step-mode limit of {} (agent.step_max_tokens_limit)")
    else:
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value > caps[0]:
            raise InvalidRequest(f"{name}: {value} exceeds {caps[1].format(caps[0])}", param=name)


def publish_limits(schemas: dict[str, Any], agent: Any) -> None:
    """Write the cluster's limits (:func:`check_limits`) into the component ``schemas`` of its OpenAPI document."""

    def bound(model: str, field: str, **keywords: Any) -> None:
        prop = schemas[model]["properties"][field]
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") != "null":
                branch.update(keywords)

    for model in (AgentChatCompletionRequest.__name__, AgentRunRequest.__name__):
        bound(model, "max_steps", maximum=agent.max_steps_limit)
    bound(AgentChatCompletionRequest.__name__, "temperature", const=agent.temperature)
    for field in ("max_tokens", "max_completion_tokens"):
        bound(AgentChatCompletionRequest.__name__, field, maximum=min(32_768, agent.max_chain_tokens))
        bound(StepChatCompletionRequest.__name__, field, maximum=min(32_768, agent.step_max_tokens_limit))


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(..., examples=["invalid_request_error"])
    #: The request field at fault, when there is one.
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, so OpenAI SDKs raise a readable error."""

    error: ErrorDetail


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, so OpenAI SDKs raise a readable error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
