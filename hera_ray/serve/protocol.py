"""Request and response models of the HTTP API (OpenAI's chat shape plus hera's agent runs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(..., max_length=200_000)


class ChatCompletionRequest(BaseModel):
    """OpenAI ``/v1/chat/completions``. ``model`` names the routing policy (``hera``, ``all-llm``, ...)."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use

    model: str = Field(..., min_length=1, max_length=200, examples=["all-slm", "hera"])
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000,
                                        examples=[[{"role": "user", "content": "What is 2 + 3?"}]])
    stream: bool = False
    max_steps: int | None = Field(None, ge=1, le=100, description="hera: steps at most (each a line of the chain of thought).")
    # allow_inf_nan: Python's JSON parser takes Infinity, which would pass ge=0 and then fail the reply.
    max_cloud_cost: float | None = Field(None, ge=0, allow_inf_nan=False, description="hera: cap on this request's cloud spend.")

    @field_validator("messages")
    @classmethod
    def _has_user_message(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.content.strip() for m in v):
            raise ValueError("messages must include a non-empty user message")
        return v

    def question(self) -> str:
        """The task: the user messages, with any system message as context before them."""
        parts = [m.content.strip() for m in self.messages if m.role in ("system", "developer", "user") and m.content.strip()]
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
