"""Parsing an assistant turn: tool calls in the Qwen/Hermes format, and the final answer.

A tool call is a JSON object inside ``<tool_call>...</tool_call>``::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A turn may hold several. :func:`parse_tool_calls` never raises: malformed blocks (unclosed tag,
invalid JSON, JSON nested deeper than :data:`~mtrl_jax.envs.tools.MAX_JSON_DEPTH`, missing name,
non-object arguments) come back as ``errors`` that the agent loop shows to the model and counts.
It takes time linear in the text's length, whatever the text (unclosed tags, deep brackets).
:class:`ToolCall` is defined in :mod:`mtrl_jax.envs.tools` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import json

from mtrl_jax.envs.tools import (
    MAX_JSON_DEPTH,
    ToolCall,  # re-exported: it lives with the tools (envs layer)
    json_text_too_deep,
)

__all__ = ["TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ParsedTurn", "ToolCall", "parse_tool_calls"]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


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


def _too_deep(what: str, text: str) -> str:
    return (f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels of brackets; "
            f"use a flatter object: {text[:200]!r}")


def _parse_block(body: str) -> ToolCall | str:
    text = body.strip()
    if json_text_too_deep(text):  # refused before json.loads: no recursion limit is reachable
        return _too_deep("tool call", text)
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
        if json_text_too_deep(args):
            return _too_deep(f"arguments of {name!r}", args)
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
    # linear scan (what a lazy ``<tool_call>(.*?)</tool_call>`` regex matched, without its
    # rescans to the end of the text for each unclosed opener): each opener, then the first
    # closer after it; an opener without a closer means no closer follows, so the scan stops
    while (start := text.find(TOOL_CALL_OPEN, pos)) >= 0:
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        if end < 0:
            break
        content_parts.append(text[pos:start])
        pos = end + len(TOOL_CALL_CLOSE)
        parsed = _parse_block(text[body_start:end])
        (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
    rest = text[pos:]
    if TOOL_CALL_OPEN in rest:
        errors.append(f"unclosed {TOOL_CALL_OPEN}: {rest[rest.index(TOOL_CALL_OPEN):][:200]!r}")
        rest = rest[:rest.index(TOOL_CALL_OPEN)]
    content_parts.append(rest)
    return ParsedTurn("".join(content_parts).strip(), tuple(calls), tuple(errors))
