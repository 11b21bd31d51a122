"""Tool calls in a model's reply, as OpenAI's ``tool_calls``.

Qwen2.5's chat template asks for each call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the Hermes format, which vLLM's ``hermes`` parser reads). Small models often drop the markers and
write the JSON alone, or in a fenced ``json`` block (Qwen2.5-Coder 0.5B and 1.5B do, measured here),
so the reply is read in this order:

1. every ``<tool_call>...</tool_call>`` block, and the text outside them as content;
2. else, a reply that is nothing but such JSON (one object, several on their own lines, or an array;
   fenced or not) whose names are all tools the caller declared;
3. else, plain content.

A marked block that is not a call of a declared tool with object arguments is a *parse failure*:
its text stays in the content, and the failure is reported (never raised: the caller gets the
model's words, not a 5xx).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)


@dataclass
class ParsedReply:
    """A reply split into its text and its tool calls (OpenAI's shape: arguments as a JSON string)."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    #: What could not be read as a call, one line each (the text stays in ``content``).
    failures: list[str] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(obj: Any, names: set[str]) -> tuple[dict[str, Any] | None, str]:
    """An OpenAI tool call from one decoded object, or (None, why not)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, "not an object with a name"
    if obj["name"] not in names:
        return None, f"{obj['name']!r} is not one of the tools ({', '.join(sorted(names)) or 'none declared'})"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return None, f"{obj['name']}: arguments are not JSON"
    if not isinstance(args, dict):
        return None, f"{obj['name']}: arguments are not an object"
    try:
        arguments = json.dumps(args, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None, f"{obj['name']}: arguments are nested too deeply"
    return {"id": new_call_id(), "type": "function", "function": {"name": obj["name"], "arguments": arguments}}, ""


def _objects(text: str) -> list[Any] | None:
    """The JSON values ``text`` consists of (one value, an array, or one per line), or None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text or text[0] not in "[{":
        return None
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except (ValueError, RecursionError):
        pass
    values = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except (ValueError, RecursionError):
            return None
    return values or None


def parse_tool_calls(text: str, tools: Iterable[str]) -> ParsedReply:
    """Split a model's ``text`` into content and calls of the named ``tools``."""
    names = set(tools)
    if "<tool_call>" in text:
        calls, failures, kept = [], [], []
        last = 0
        for m in _TAGGED.finditer(text):
            kept.append(text[last:m.start()])
            last = m.end()
            block = m.group(1).strip()
            try:
                obj = json.loads(_FENCE.sub(r"\1", block))
            except (ValueError, RecursionError) as e:  # JSONDecodeError, a 4300-digit number, deep nesting
                failures.append(f"<tool_call> block is not JSON ({getattr(e, 'msg', None) or str(e)[:100]})")
                kept.append(m.group(0))
                continue
            call, why = _call(obj, names)
            if call is None:
                failures.append(f"<tool_call> block: {why}")
                kept.append(m.group(0))
            else:
                calls.append(call)
        kept.append(text[last:])
        content = "".join(kept).strip()
        return ParsedReply(content or None, calls, failures)
    values = _objects(text) if names else None
    if values:
        calls = [_call(v, names)[0] for v in values]
        if all(c is not None for c in calls):
            return ParsedReply(None, calls)
    return ParsedReply(text)
