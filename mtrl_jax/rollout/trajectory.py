"""The trajectory of one episode, token-in/token-out.

An episode is one growing token sequence (a *sample*): context tokens (prompt, tool results,
template glue) with loss mask 0, and the tokens the policy sampled with loss mask 1 and their
behaviour log-probs. A chat template that rewrites earlier turns (e.g. drops reasoning from
history) breaks the prefix property; the agent loop then starts a new sample holding the
re-rendered conversation, so a trajectory is a list of samples (usually one). Training packs
each sample as its own segment, all with the trajectory's advantage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

FinishReason = Literal["answered", "max_turns", "truncated", "error"]


@dataclasses.dataclass
class Sample:
    """One token sequence. Arrays are parallel, one entry per token."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    turn_index: list[int] = dataclasses.field(default_factory=list)
    policy_version: list[int] = dataclasses.field(default_factory=list)

    def add_context(self, tokens: list[int], turn: int, version: int = -1) -> None:
        self.tokens += tokens
        self.loss_mask += [0] * len(tokens)
        self.logprobs += [0.0] * len(tokens)
        self.turn_index += [turn] * len(tokens)
        self.policy_version += [version] * len(tokens)

    def add_sampled(self, tokens: list[int], logprobs: list[float], turn: int,
                    version: int = -1) -> None:
        if len(tokens) != len(logprobs):
            raise ValueError(f"{len(tokens)} sampled tokens but {len(logprobs)} log-probs")
        self.tokens += tokens
        self.loss_mask += [1] * len(tokens)
        self.logprobs += [float(x) for x in logprobs]
        self.turn_index += [turn] * len(tokens)
        self.policy_version += [version] * len(tokens)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(tokens=np.asarray(self.tokens, np.int32),
                    loss_mask=np.asarray(self.loss_mask, np.int8),
                    logprobs=np.asarray(self.logprobs, np.float32),
                    turn_index=np.asarray(self.turn_index, np.int32),
                    policy_version=np.asarray(self.policy_version, np.int32))

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class ToolCallRecord:
    """One tool call. ``result`` is what the model read (``Error: ...`` for a failure), capped
    by the agent loop's ``max_tool_result_bytes`` / ``max_tool_result_tokens``: ``truncated``
    says it was cut (the text then ends with a note), ``result_bytes`` is the UTF-8 size of
    the whole result before any cut (None: not measured)."""

    turn: int
    name: str
    arguments: Any
    result: str
    error: str | None = None  # None = success
    seconds: float = 0.0
    truncated: bool = False
    result_bytes: int | None = None


@dataclasses.dataclass
class Trajectory:
    """Everything training, tracking and evaluation need from one episode."""

    task_id: str
    episode_id: str
    samples: list[Sample]
    messages: list[dict[str, Any]]
    finish_reason: FinishReason
    num_turns: int
    final_text: str | None = None
    reward: float = 0.0
    turn_rewards: list[float] | None = None
    reward_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    strict_score: float | None = None
    tool_calls: list[ToolCallRecord] = dataclasses.field(default_factory=list)
    format_errors: int = 0
    truncated_turns: int = 0
    template_rewrites: int = 0
    truncated_tool_results: int = 0  # tool messages cut by the tool-result caps
    error: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    group_id: str | None = None

    @property
    def num_sampled_tokens(self) -> int:
        return sum(sum(s.loss_mask) for s in self.samples)

    @property
    def tool_error_count(self) -> int:
        return sum(1 for c in self.tool_calls if c.error is not None)
