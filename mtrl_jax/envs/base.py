"""The agent-environment interface: what a user writes to plug a task into training.

An :class:`Environment` is created per episode. A user subclasses it (or uses
:class:`FunctionEnvironment`) and provides:

- ``tools()`` -- the tool surface (:class:`~mtrl_jax.envs.tools.Tool` objects, e.g. from ``@tool``
  functions, OpenAI or Bedrock schemas);
- ``setup(task)`` / ``teardown()`` -- per-episode resources; ``teardown`` always runs (the agent
  loop calls it in ``finally``: after an answer, ``max_turns``, an exception or cancellation);
- ``reward(episode)`` -- scores the finished conversation and reports through
  ``episode.update_reward(reward, metrics)``, ``reward`` a scalar or one value per turn.

Tools may be sync or async. Each call runs under ``tool_timeout_s``; invalid arguments, unknown
tools, exceptions and timeouts become :class:`ToolError` messages the model reads next turn.
An environment whose tools answer from data rather than Python functions (replayed fixtures,
SOP tool maps) overrides ``invoke`` and keeps that guarded path; ``validate_schema = False``
turns the JSON-schema check off when the environment reproduces a system's own argument
errors, and ``unknown_tool_message`` words the answer to a call of a tool that does not exist.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from mtrl_jax.envs.tools import Tool, ToolCall, validate_arguments


@dataclasses.dataclass
class Task:
    """One task instance.

    Attributes:
      id: unique within its family and split.
      family, name: the task's name is ``family:name`` (``sop_synth:aircraft_inspection``).
      prompt: the user message; system: the system prompt (e.g. the SOP) or ``None``.
      expected: ground-truth output fields (for scorers), if known.
      data: anything the environment needs (the CSV row, a database, ...).
      split: ``train``, ``val`` or ``test``.
    """

    id: str
    family: str
    name: str
    prompt: str
    system: str | None = None
    expected: dict[str, Any] | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: str = "test"

    @property
    def full_name(self) -> str:
        return f"{self.family}:{self.name}"


class ToolError(Exception):
    """A tool call that failed; its message is shown to the model."""


@dataclasses.dataclass
class Episode:
    """What a reward function sees, and where it reports."""

    task: Task
    messages: list[dict[str, Any]]
    final_text: str | None
    finish_reason: str
    num_turns: int
    tool_calls: list[Any]
    reward: float | list[float] | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def update_reward(self, reward: float | Sequence[float],
                      metrics: dict[str, float] | None = None) -> None:
        """Report the episode's reward: a scalar, or one value per assistant turn."""
        if isinstance(reward, int | float):
            self.reward = float(reward)
        else:
            values = [float(r) for r in reward]
            if len(values) != self.num_turns:
                raise ValueError(f"per-turn reward has {len(values)} values but the episode "
                                 f"has {self.num_turns} turns")
            self.reward = values
        if metrics:
            self.metrics.update({k: float(v) for k, v in metrics.items()})


def format_tool_result(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class Environment:
    """Base class; override ``tools``, ``setup``, ``teardown`` and ``reward``."""

    tool_timeout_s: float = 10.0
    #: Check arguments against each tool's JSON schema before the call. Off for environments
    #: that reproduce another system's own argument checks and messages (a replayed benchmark).
    validate_schema: bool = True

    def tools(self) -> list[Tool]:
        return []

    async def setup(self, task: Task) -> None:
        self.task = task

    async def teardown(self) -> None:
        pass

    def reward(self, episode: Episode) -> None:
        episode.update_reward(0.0)

    def tool_map(self) -> dict[str, Tool]:
        if not hasattr(self, "_tool_map"):
            self._tool_map = {t.name: t for t in self.tools()}
        return self._tool_map

    async def invoke(self, tool: Tool, arguments: dict[str, Any]) -> Any:
        """Run a tool's function; environments with schema-only tools override this."""
        if tool.fn is None:
            raise ToolError(f"tool {tool.name!r} has no implementation in this environment")
        if tool.is_async:
            return await tool.fn(**arguments)
        return await asyncio.to_thread(tool.fn, **arguments)

    def unknown_tool_message(self, name: str) -> str:
        """What the model reads after calling a tool that does not exist."""
        return f"unknown tool {name!r}; available tools: {sorted(self.tool_map())}"

    async def call_tool(self, call: ToolCall) -> str:
        """Validate and run one call under the timeout; failures raise :class:`ToolError`."""
        tool = self.tool_map().get(call.name)
        if tool is None:
            raise ToolError(self.unknown_tool_message(call.name))
        if self.validate_schema:
            errors = validate_arguments(tool, call.arguments)
            if errors:
                raise ToolError(f"invalid arguments for {call.name!r}: " + "; ".join(errors))
        try:
            result = await asyncio.wait_for(self.invoke(tool, dict(call.arguments)),
                                            self.tool_timeout_s)
        except TimeoutError:
            raise ToolError(f"tool {call.name!r} timed out after {self.tool_timeout_s:g} s") \
                from None
        except ToolError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise ToolError(f"tool {call.name!r} failed: {type(e).__name__}: {e}") from e
        return format_tool_result(result)


class FunctionEnvironment(Environment):
    """An environment from plain parts: a tool list and a reward function.

    ``reward_fn(episode)`` calls ``episode.update_reward(...)``.
    """

    def __init__(self, tools: Sequence[Tool], reward_fn: Callable[[Episode], None],
                 tool_timeout_s: float = 10.0):
        self._tools = list(tools)
        self._reward_fn = reward_fn
        self.tool_timeout_s = tool_timeout_s

    def tools(self) -> list[Tool]:
        return self._tools

    def reward(self, episode: Episode) -> None:
        self._reward_fn(episode)
