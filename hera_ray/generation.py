"""The generation request and result shared by every model backend (edge llama.cpp workers,
the cloud deployment's llama.cpp, vLLM and OpenAI-compatible backends), with the checks that do
not depend on the model. Plain dataclasses: no Ray, no torch, no grpc.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hera_ray.errors import InvalidRequest

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def params_from_dict(d: dict[str, Any]) -> GenerationParams:
    d = dict(d)
    d["messages"] = tuple(tuple(m) for m in d.get("messages", ()))
    d["stop"] = tuple(d.get("stop", ()))
    return GenerationParams(**d)


def validate_params(p: GenerationParams, n_ctx: int | None = None) -> None:
    """Refuse an empty prompt or out-of-range settings with a message naming the field and the limit."""
    if p.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be > 0, got {p.max_tokens}")
    if n_ctx is not None and p.max_tokens > n_ctx:
        raise InvalidRequest(f"max_tokens {p.max_tokens} exceeds the context window of {n_ctx} tokens")
    if not 0.0 <= p.temperature <= 5.0:
        raise InvalidRequest(f"temperature must be in [0, 5], got {p.temperature}")
    if p.top_p is not None and not 0.0 < p.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k is not None and p.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {p.top_k}")
    if len(p.stop) > MAX_STOP_STRINGS or any(not s for s in p.stop):
        raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
    if p.prompt and p.messages:
        raise InvalidRequest("give either prompt or messages, not both")
    for role, _content in p.messages:
        if role not in CHAT_ROLES:
            raise InvalidRequest(f"message role {role!r} is not one of {', '.join(CHAT_ROLES)}")
    if p.messages:
        if not any(c.strip() for _r, c in p.messages):
            raise InvalidRequest("empty prompt: every message's content is empty")
    elif not p.prompt.strip():
        raise InvalidRequest("empty prompt: give a non-empty prompt or messages")
