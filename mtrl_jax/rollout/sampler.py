"""The sampler interface (token ids in, token ids and log-probs out) and a scripted stub.

The agent loop passes the *whole* episode so far (``tokens``) on every turn; a sampler that keeps
a KV cache per ``episode_id`` feeds only what it has not seen (see
:class:`mtrl_jax.rollout.jax_sampler.JaxSampler`). ``release(episode_id)`` frees that state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """``tokens`` sampled (the stop token included when ``finish_reason == "stop"``), their
    behaviour ``logprobs``, and the policy version that produced them."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    policy_version: int = -1


class Sampler(Protocol):
    async def sample(self, episode_id: str, tokens: Sequence[int], max_tokens: int,
                     params: Any | None = None) -> SampleResult:
        """``params``: the call's sampling parameters
        (:class:`~mtrl_jax.models.decoding.SamplingParams`; None = the sampler's default)."""
        ...

    def release(self, episode_id: str) -> None: ...


class ScriptedSampler:
    """A stub policy for tests and benchmarks: ``script(episode_id, turn, prompt_tokens) ->
    text``. The text is tokenised, the stop token appended, and truncated to ``max_tokens``
    (then ``finish_reason="length"``). Every token gets log-prob ``logprob``.
    """

    def __init__(self, tokenizer, script: Callable[[str, int, Sequence[int]], str],
                 stop_token_id: int, logprob: float = -0.5, delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.script = script
        self.stop_token_id = stop_token_id
        self.logprob = logprob
        self.delay_s = delay_s
        self.turns: dict[str, int] = {}
        self.seen: dict[str, list[int]] = {}

    async def sample(self, episode_id: str, tokens: Sequence[int], max_tokens: int,
                     params: Any | None = None) -> SampleResult:
        turn = self.turns.get(episode_id, 0)
        self.turns[episode_id] = turn + 1
        self.seen[episode_id] = list(tokens)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = self.script(episode_id, turn, tokens)
        out = self.tokenizer.encode(text, add_special_tokens=False) + [self.stop_token_id]
        finish: Literal["stop", "length"] = "stop"
        if len(out) > max_tokens:
            out, finish = out[:max_tokens], "length"
        return SampleResult(out, [self.logprob] * len(out), finish)

    def release(self, episode_id: str) -> None:
        self.turns.pop(episode_id, None)
