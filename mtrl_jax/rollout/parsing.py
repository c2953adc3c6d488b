"""Parsing an assistant turn: tool calls in the Qwen/Hermes format, and the final answer.

A tool call is a JSON object inside ``<tool_call>...</tool_call>``::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A turn may hold several. :func:`parse_tool_calls` never raises: malformed blocks (unclosed tag,
invalid JSON, missing name, non-object arguments) come back as ``errors`` that the agent loop
shows to the model and counts. :class:`ToolCall` is defined in :mod:`mtrl_jax.envs.tools` and
re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import re

from mtrl_jax.envs.tools import ToolCall  # re-exported: it lives with the tools (envs layer)

__all__ = ["TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ParsedTurn", "ToolCall", "parse_tool_calls"]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """``content``: the text outside tool-call blocks; ``tool_calls``: the well-formed calls;
    ``errors``: one message per malformed block."""

    content: str
    tool_calls: tuple[ToolCall, ...]
    errors: tuple[str, ...]

    @property
    def attempted_tool_call(self) -> bool:
        return bool(self.tool_calls or self.errors)


def _parse_block(body: str) -> ToolCall | str:
    text = body.strip()
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        return f"tool call is not valid JSON ({type(e).__name__}: {str(e)[:120]}): {text[:200]!r}"
    if not isinstance(obj, dict):
        return f"tool call must be a JSON object with 'name' and 'arguments', got {text[:200]!r}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return f"tool call lacks a string 'name': {text[:200]!r}"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError, ValueError):
            return f"arguments of {name!r} are a string that is not JSON: {args[:200]!r}"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return f"arguments of {name!r} must be a JSON object, got {type(args).__name__}"
    return ToolCall(name, args, text)


def parse_tool_calls(text: str) -> ParsedTurn:
    """Split an assistant turn into content, tool calls and format errors (never raises)."""
    if not isinstance(text, str):
        return ParsedTurn("", (), (f"turn text is {type(text).__name__}, not str",))
    calls: list[ToolCall] = []
    errors: list[str] = []
    content_parts: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        content_parts.append(text[pos:m.start()])
        pos = m.end()
        parsed = _parse_block(m.group(1))
        (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
    rest = text[pos:]
    if TOOL_CALL_OPEN in rest:
        errors.append(f"unclosed {TOOL_CALL_OPEN}: {rest[rest.index(TOOL_CALL_OPEN):][:200]!r}")
        rest = rest[:rest.index(TOOL_CALL_OPEN)]
    content_parts.append(rest)
    return ParsedTurn("".join(content_parts).strip(), tuple(calls), tuple(errors))
