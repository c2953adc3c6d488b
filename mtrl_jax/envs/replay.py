"""Read-only replay: tools answered from recorded fixtures keyed by their arguments.

Fixtures are JSONL (one ``{"tool": name, "arguments": {...}, "result": ...}`` per line) or CSV
(columns ``tool``, ``arguments`` (JSON) and ``result``). The same call always gets the same
recorded answer -- hermetic, cheap and reproducible. A call with no recording gets
``not_found`` (a :class:`ToolError` the model reads). Argument objects are matched by their
canonical JSON (key order and whitespace do not matter).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

from mtrl_jax.envs.base import Environment, ToolError
from mtrl_jax.envs.tools import Tool


def canonical(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def load_fixtures(path: str | os.PathLike) -> dict[tuple[str, str], Any]:
    """``{(tool, canonical arguments): result}`` from a ``.jsonl`` or ``.csv`` file."""
    path = os.fspath(path)
    out: dict[tuple[str, str], Any] = {}
    if path.endswith(".jsonl"):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = (rec["tool"], canonical(rec["arguments"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a fixture record ({e})") from None
                out[key] = rec["result"]
    elif path.endswith(".csv"):
        with open(path, newline="") as f:
            for n, rec in enumerate(csv.DictReader(f), 2):
                try:
                    out[(rec["tool"], canonical(json.loads(rec["arguments"])))] = rec["result"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: not a fixture record ({e})") from None
    else:
        raise ValueError(f"fixtures must be .jsonl or .csv, got {path}")
    return out


class ReplayEnvironment(Environment):
    """Answers ``tools`` (schemas only) from fixtures; subclass to add ``reward``."""

    def __init__(self, tools: Sequence[Tool], fixtures: dict[tuple[str, str], Any] | str,
                 not_found: str = "no recorded result for {tool} with these arguments"):
        self._tools = list(tools)
        self.fixtures = load_fixtures(fixtures) if isinstance(fixtures, str) else fixtures
        self.not_found = not_found

    def tools(self) -> list[Tool]:
        return self._tools

    async def invoke(self, tool: Tool, arguments: dict[str, Any]) -> Any:
        key = (tool.name, canonical(arguments))
        if key not in self.fixtures:
            raise ToolError(self.not_found.format(tool=tool.name))
        return self.fixtures[key]
