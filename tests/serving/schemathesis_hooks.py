"""schemathesis hooks (loaded through ``SCHEMATHESIS_HOOKS``) for what the schema states only in words.

The chat request's conversation must hang together across messages: a ``tool`` message answers a
call an assistant message before it issued and nobody has answered yet, tool-call arguments are a
JSON object, two tools do not share a name. JSON Schema cannot state these, so the schema says them
in its descriptions and the server refuses them with a 400 (``hera_ray.serve.protocol.check_tool_history``).
Data generated from the schema alone breaks them at random. This hook mends a valid (positive)
generated body so that it keeps them too, and leaves invalid (negative) ones alone: schemathesis
still checks that valid data is accepted (``positive_data_acceptance``) and invalid data refused.
Whether the server refuses what breaks these rules is tested in ``test_serving.py``.
"""

from __future__ import annotations

import copy
import json
import math
import re

import schemathesis

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


MAX_DEPTH = 32  # the schema's words: a JSON object nested at most 32 levels deep


def _depth(value, level: int = 0) -> int:
    if level > MAX_DEPTH or not isinstance(value, (dict, list)):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in items), default=level + 1)


def _a_json_object(text: str) -> bool:
    """JSON (no NaN or Infinity, no number too large for a double) holding an object; blank is ``{}``."""
    if not text.strip():
        return True

    def constant(c: str):
        raise ValueError(c)

    def finite(number: str) -> float:
        if math.isinf(value := float(number)):
            raise ValueError(number)
        return value

    try:
        value = json.loads(text, parse_constant=constant, parse_float=finite)
    except (RecursionError, ValueError):
        return False
    return isinstance(value, dict) and _depth(value) <= MAX_DEPTH


def mend_conversation(body: dict) -> dict:
    """``body`` with its tool history made to hang together (in place, and returned)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        waiting: list[str] = []  # ids issued and not yet answered, oldest first
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                continue
            calls = m.get("tool_calls") if m.get("role") == "assistant" else None
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str) \
                        and not _a_json_object(function["arguments"]):
                    function["arguments"] = "{}"
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    waiting.append(call["id"])
            if m.get("role") == "tool" and isinstance(m.get("tool_call_id"), str):
                if m["tool_call_id"] in waiting:
                    waiting.remove(m["tool_call_id"])
                elif waiting:
                    m["tool_call_id"] = waiting.pop(0)
                else:  # nothing to answer: say it as the user instead
                    messages[i] = {k: v for k, v in m.items() if k != "tool_call_id"} | {"role": "user"}
    tools = body.get("tools")
    if isinstance(tools, list):
        seen: set[str] = set()
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not _NAME.match(name):
                continue
            stem, n = name[:56], 0
            while name in seen:
                n += 1
                name = f"{stem}_{n}"
            function["name"] = name
            seen.add(name)
    return body


@schemathesis.hook
def map_case(context, case):
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if isinstance(case.body, dict) and not negative:
        # A copy: the generated body may share objects with cached draws and the schema's examples,
        # which other cases (negative ones too) are built from.
        case.body = mend_conversation(copy.deepcopy(case.body))
    return case
