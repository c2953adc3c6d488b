"""The multi-turn agent loop, token-in/token-out.

One episode:

1. ``env.setup(task)``; the system prompt, user prompt and tool schemas are rendered with the
   model's chat template and tokenised once -- the episode's first context tokens. A template
   without a tool section (SmolLM2's, many base-model templates) gets the tool schemas in the
   system message instead (:func:`~mtrl_jax.models.tokenizer.render_chat`'s fallback).
2. Each turn the :class:`~mtrl_jax.rollout.sampler.Sampler` continues the episode's token
   sequence; the sampled tokens enter the trajectory as they are (loss mask 1, behaviour
   log-probs, turn index). The turn's text is parsed for ``<tool_call>`` blocks.
3. No tool call: the turn is the final answer. Otherwise the calls run concurrently (each under
   the environment's timeout); results -- or error messages for invalid JSON, unknown tools, bad
   arguments, exceptions, timeouts -- become tool messages. The template renders the conversation
   again and only the *new* text (after what the episode already holds) is tokenised and
   appended (loss mask 0). Earlier tokens are never re-tokenised.
   Every tool message is capped before it is tokenised: first at ``max_tool_result_bytes`` of
   UTF-8 (cut at a character boundary; a huge result is never tokenised whole), then at
   ``max_tool_result_tokens`` tokens; a cut result ends with a note the model reads
   (``[tool result truncated: showing 16384 of 41943040 bytes (byte cap)]``), its record says
   ``truncated`` and the trajectory counts it (``truncated_tool_results``).
4. Stop on an answer, ``max_turns``, a turn that hits ``sampling_max_tokens`` without its stop
   token, or the context limit. ``env.reward(episode)`` scores it; ``env.teardown()`` runs in
   ``finally`` whatever happened (cancellation included).

History rewrites: the assistant turn is kept in the conversation as its raw text, so a template
that renders content verbatim reproduces the episode's text exactly. A template that rewrites
earlier turns (e.g. strips reasoning) breaks the prefix property; this is detected, counted
(``template_rewrites``) and, with ``on_template_rewrite="new_sample"``, a new sample starts from
the re-rendered conversation (``"fail"`` ends the episode with an error instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from mtrl_jax.envs.base import Environment, Episode, Task, ToolError, format_tool_result
from mtrl_jax.models.tokenizer import render_chat, template_renders_tools
from mtrl_jax.rollout.parsing import parse_tool_calls
from mtrl_jax.rollout.sampler import Sampler
from mtrl_jax.rollout.trajectory import Sample, ToolCallRecord, Trajectory


@dataclasses.dataclass(frozen=True)
class AgentLoopConfig:
    """``max_turns`` assistant turns; ``sampling_max_tokens`` per turn; ``max_context_tokens``
    for the whole sample; what to do when the template rewrites history; the caps on each tool
    message the model reads (``max_tool_result_bytes`` of UTF-8, then
    ``max_tool_result_tokens``; the truncation note comes on top). ``tool_specs``: ``auto``
    shows the tool specs through the chat template, or in the system message when the template
    has no tool section (:func:`~mtrl_jax.models.tokenizer.render_chat`); ``template`` leaves
    them to the template alone (a template without a tool section then shows none: a model
    that learned its tools in training, like the CPU demo's)."""

    max_turns: int = 8
    sampling_max_tokens: int = 256
    max_context_tokens: int = 4096
    on_template_rewrite: Literal["new_sample", "fail"] = "new_sample"
    max_tool_result_bytes: int = 16384
    max_tool_result_tokens: int = 1024
    tool_specs: Literal["auto", "template"] = "auto"

    def __post_init__(self):
        if self.max_turns < 1 or self.sampling_max_tokens < 1 or self.max_context_tokens < 2:
            raise ValueError("max_turns, sampling_max_tokens and max_context_tokens must be >= 1")
        if self.on_template_rewrite not in ("new_sample", "fail"):
            raise ValueError("on_template_rewrite must be 'new_sample' or 'fail'")
        if self.tool_specs not in ("auto", "template"):
            raise ValueError(f"tool_specs must be 'auto' or 'template', got {self.tool_specs!r}")
        for name in ("max_tool_result_bytes", "max_tool_result_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_rollout(cls, rollout, **overrides) -> AgentLoopConfig:
        """The config of a recipe's ``rollout`` section (:class:`~mtrl_jax.config.RolloutSection`:
        turn, token and context budgets, the tool-result caps), with ``overrides``."""
        fields = ("max_turns", "sampling_max_tokens", "max_context_tokens",
                  "max_tool_result_bytes", "max_tool_result_tokens", "tool_specs")
        return cls(**{**{f: getattr(rollout, f) for f in fields}, **overrides})


class TemplateRewriteError(RuntimeError):
    pass


# ---------------------------------------------------------------------- tool-result caps

_ENCODE_CHUNK = 1 << 20  # characters encoded at a time when measuring a huge non-ASCII text


@dataclasses.dataclass(frozen=True)
class CappedText:
    """A tool message as the model reads it: ``text`` (with the note when cut), the cap that
    cut it (``truncated_by``: ``"bytes"`` or ``"tokens"``, None when whole) and the original
    UTF-8 size."""

    text: str
    truncated_by: Literal["bytes", "tokens"] | None
    original_bytes: int

    @property
    def truncated(self) -> bool:
        return self.truncated_by is not None


def utf8_size(text: str) -> int:
    """UTF-8 bytes of ``text`` (lone surrogates count 3) without encoding it whole at once."""
    if text.isascii():
        return len(text)
    return sum(len(text[i:i + _ENCODE_CHUNK].encode("utf-8", "surrogatepass"))
               for i in range(0, len(text), _ENCODE_CHUNK))


def utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` of at most ``max_bytes`` UTF-8 bytes, cut at a character
    boundary; only the first ``max_bytes`` characters are ever encoded."""
    if text.isascii():
        return text[:max_bytes]
    head = text[:max_bytes].encode("utf-8", "surrogatepass")
    if len(head) <= max_bytes:
        return text[:max_bytes]
    cut = max_bytes
    while cut > 0 and (head[cut] & 0xC0) == 0x80:  # back to the first byte of a character
        cut -= 1
    return head[:cut].decode("utf-8", "surrogatepass")


def cap_tool_text(text: str, max_bytes: int, max_tokens: int, tokenizer) -> CappedText:
    """``text`` cut to ``max_bytes`` of UTF-8, then to ``max_tokens`` tokens of ``tokenizer``
    (only the byte-capped text is tokenised; ``tokenizer=None``: bytes only); a cut text gets
    a note naming the cap and the original size, e.g. ``[tool result truncated: showing 16384
    of 41943040 bytes (byte cap)]``."""
    size = utf8_size(text)
    cut_by: Literal["bytes", "tokens"] | None = None
    if size > max_bytes:
        text, cut_by = utf8_prefix(text, max_bytes), "bytes"
    # an ASCII text shorter than the token cap cannot exceed it (every token covers at least
    # one character, plus at most one prefix token): no need to tokenise it
    if tokenizer is not None and not (text.isascii() and len(text) < max_tokens):
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) > max_tokens:
            try:
                cut = tokenizer.decode(list(tokens[:max_tokens]), skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
            except TypeError:  # a tokenizer without the option
                cut = tokenizer.decode(list(tokens[:max_tokens]), skip_special_tokens=False)
            # a token boundary inside a multi-byte character decodes to U+FFFD
            while cut.endswith("\ufffd") and not text.startswith(cut):
                cut = cut[:-1]
            text, cut_by = cut, "tokens"
    if cut_by is None:
        return CappedText(text, None, size)
    shown = utf8_size(text)
    if cut_by == "bytes":
        note = f"[tool result truncated: showing {shown} of {size} bytes (byte cap)]"
    else:
        note = (f"[tool result truncated: showing {max_tokens} tokens, {shown} of {size} bytes "
                "(token cap)]")
    return CappedText(f"{text}\n{note}", cut_by, size)


@dataclasses.dataclass
class _Text:
    """The text an episode's current sample holds, tracked alongside its tokens."""

    text: str = ""


class AgentLoop:
    """Runs episodes of one tokenizer/sampler pair.

    Args:
      tokenizer: an HF tokenizer with a chat template (``mtrl_jax.models.tokenizer``).
      sampler: a :class:`~mtrl_jax.rollout.sampler.Sampler`.
      config: :class:`AgentLoopConfig`.
      stop_token_id: the end-of-turn token the sampler stops on (default: ``eos_token_id``).
    """

    def __init__(self, tokenizer, sampler: Sampler, config: AgentLoopConfig = AgentLoopConfig(),
                 stop_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.config = config
        self.stop_token_id = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
        self.stop_text = tokenizer.decode([self.stop_token_id], skip_special_tokens=False)
        self._template_has_tools: bool | None = None  # found out on first use

    # ------------------------------------------------------------------ rendering

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool = True) -> str:
        if tools and self._template_has_tools is None:
            self._template_has_tools = (self.config.tool_specs == "template"
                                        or template_renders_tools(self.tokenizer))
        return render_chat(self.tokenizer, messages, tools=tools or None,
                           add_generation_prompt=add_generation_prompt,
                           template_has_tools=self._template_has_tools)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    # ------------------------------------------------------------------ one episode

    async def run(self, env: Environment, task: Task, *, episode_id: str | None = None,
                  group_id: str | None = None, sampling: Any | None = None) -> Trajectory:
        """Run one episode to its end; never raises for model or tool errors (the trajectory's
        ``finish_reason`` is ``"error"`` and ``error`` holds the traceback for environment or
        sampler failures). Cancellation propagates after teardown.

        ``sampling``: the episode's sampling parameters
        (:class:`~mtrl_jax.models.decoding.SamplingParams`), passed to the sampler on every
        turn; its ``max_tokens`` is the per-turn budget. None: the sampler's default parameters
        and ``config.sampling_max_tokens``."""
        episode_id = episode_id or uuid.uuid4().hex
        t_start = time.perf_counter()
        timings = {"sample_s": 0.0, "tools_s": 0.0}
        samples: list[Sample] = []
        messages: list[dict[str, Any]] = []
        records: list[ToolCallRecord] = []
        counters = {"format_errors": 0, "truncated_turns": 0, "template_rewrites": 0,
                    "truncated_tool_results": 0}
        finish = "error"
        final_text: str | None = None
        error: str | None = None
        turns = 0
        try:
            await env.setup(task)
            tool_schemas = [t.openai_schema() for t in env.tools()]
            if task.system is not None:
                messages.append({"role": "system", "content": task.system})
            messages.append({"role": "user", "content": task.prompt})
            sample, text = self._new_sample(messages, tool_schemas, turn=0)
            samples.append(sample)
            finish = "max_turns"
            turn_cap = self.config.sampling_max_tokens if sampling is None else \
                sampling.max_tokens
            for turn in range(self.config.max_turns):
                budget = min(turn_cap, self.config.max_context_tokens - len(sample))
                if budget <= 0:
                    finish = "truncated"
                    break
                t0 = time.perf_counter()
                res = await self.sampler.sample(episode_id, sample.tokens, budget, sampling)
                timings["sample_s"] += time.perf_counter() - t0
                sample.add_sampled(res.tokens, res.logprobs, turn, res.policy_version)
                turns = turn + 1
                turn_tokens = list(res.tokens)
                if res.finish_reason == "stop" and turn_tokens[-1:] == [self.stop_token_id]:
                    turn_tokens = turn_tokens[:-1]
                raw = self._decode(turn_tokens)
                text.text += raw + (self.stop_text if res.finish_reason == "stop" else "")
                messages.append({"role": "assistant", "content": raw})
                if res.finish_reason != "stop":
                    # counts turns cut by sampling_max_tokens, not by the context limit
                    if budget == turn_cap:
                        counters["truncated_turns"] += 1
                    finish = "truncated"
                    break
                parsed = parse_tool_calls(raw)
                if not parsed.attempted_tool_call:
                    final_text = raw
                    finish = "answered"
                    break
                counters["format_errors"] += len(parsed.errors)
                t0 = time.perf_counter()
                results = await asyncio.gather(*(self._run_call(env, c, turn)
                                                 for c in parsed.tool_calls))
                timings["tools_s"] += time.perf_counter() - t0
                records.extend(results)
                for rec in results:
                    counters["truncated_tool_results"] += rec.truncated
                    messages.append({"role": "tool", "name": rec.name, "content": rec.result})
                for err in parsed.errors:
                    capped = self.cap_tool_result(f"Error: {err}")
                    counters["truncated_tool_results"] += capped.truncated
                    messages.append({"role": "tool", "name": "error", "content": capped.text})
                if turn + 1 == self.config.max_turns:
                    break  # no turn left to read the results
                extended = self._extend(samples, sample, text, messages, tool_schemas,
                                        turn + 1, counters)
                if extended is None:  # the tool results leave no room for another turn
                    finish = "truncated"
                    break
                sample, text = extended
        except asyncio.CancelledError:
            finish, error = "error", "cancelled"
            raise
        except Exception:
            finish, error = "error", traceback.format_exc(limit=8)
        finally:
            try:
                await _uncancellable(env.teardown())
            except Exception:
                error = (error or "") + "teardown failed:\n" + traceback.format_exc(limit=4)
                finish = "error"
            release = getattr(self.sampler, "release", None)
            if release is not None:
                release(episode_id)

        episode = Episode(task, messages, final_text, finish, turns, records)
        reward, turn_rewards, metrics = 0.0, None, {}
        if error is None:
            try:
                env.reward(episode)
                if isinstance(episode.reward, list):
                    turn_rewards = episode.reward
                    reward = float(sum(turn_rewards))
                elif episode.reward is not None:
                    reward = episode.reward
                metrics = episode.metrics
            except Exception:
                finish, error = "error", "reward failed:\n" + traceback.format_exc(limit=6)
        timings["total_s"] = time.perf_counter() - t_start
        return Trajectory(
            task_id=task.id, episode_id=episode_id, samples=samples, messages=messages,
            finish_reason=finish, num_turns=turns, final_text=final_text, reward=reward,
            turn_rewards=turn_rewards, reward_metrics=metrics, tool_calls=records,
            error=error, timings=timings, group_id=group_id, **counters)

    def _new_sample(self, messages, tool_schemas, turn: int) -> tuple[Sample, _Text]:
        text = self._render(messages, tool_schemas)
        sample = Sample()
        sample.add_context(self._encode(text), turn)
        return sample, _Text(text)

    def _extend(self, samples: list[Sample], sample: Sample, text: _Text, messages,
                tool_schemas, turn: int, counters: dict[str, int]
                ) -> tuple[Sample, _Text] | None:
        """Append the template's new text after the tool results; handle history rewrites.

        Returns ``None`` (appending nothing) when the result would leave no room in
        ``max_context_tokens`` for another sampled token."""
        full = self._render(messages, tool_schemas)
        limit = self.config.max_context_tokens
        if full.startswith(text.text):
            delta = self._encode(full[len(text.text):])
            if len(sample) + len(delta) >= limit:
                return None
            sample.add_context(delta, turn)
            text.text = full
            return sample, text
        counters["template_rewrites"] += 1
        if self.config.on_template_rewrite == "fail":
            raise TemplateRewriteError(
                "the chat template re-renders earlier turns differently from the tokens the "
                "episode holds (prefix mismatch at char "
                f"{_common_prefix(full, text.text)}); set on_template_rewrite='new_sample'")
        new, new_text = self._new_sample(messages, tool_schemas, turn)
        if len(new) >= limit:
            return None
        samples.append(new)
        return new, new_text

    async def _run_call(self, env: Environment, call, turn: int) -> ToolCallRecord:
        """One call; its result (or ``Error: <message>``) capped by :meth:`cap_tool_result`.
        A capped error keeps the cut message (with the note) as ``error``."""
        t0 = time.perf_counter()
        error = None
        try:
            result = await env.call_tool(call)
            if not isinstance(result, str):  # an environment overriding call_tool
                result = format_tool_result(result)
            capped = self.cap_tool_result(result)
        except ToolError as e:
            capped = self.cap_tool_result(f"Error: {e}")
            error = capped.text.removeprefix("Error: ")
        return ToolCallRecord(turn, call.name, call.arguments, capped.text, error,
                              time.perf_counter() - t0, truncated=capped.truncated,
                              result_bytes=capped.original_bytes)

    def cap_tool_result(self, text: str) -> CappedText:
        """``text`` cut to ``config.max_tool_result_bytes`` UTF-8 bytes (at a character
        boundary, before any tokenisation), then to ``config.max_tool_result_tokens`` tokens
        (the byte-capped text tokenised and the cut decoded back); a cut text ends with a note
        saying which cap cut it and the original size."""
        return cap_tool_text(text, self.config.max_tool_result_bytes,
                             self.config.max_tool_result_tokens, self.tokenizer)

    # ------------------------------------------------------------------ many episodes

    async def run_many(self, make_env: Callable[[Task], Environment], tasks: Sequence[Task], *,
                       group_size: int = 1, concurrency: int = 256) -> list[Trajectory]:
        """``group_size`` episodes per task, at most ``concurrency`` at once, in task order."""
        sem = asyncio.Semaphore(concurrency)

        async def one(task: Task, k: int) -> Trajectory:
            async with sem:
                return await self.run(make_env(task), task, episode_id=f"{task.id}#{k}",
                                      group_id=task.id)

        return list(await asyncio.gather(*(one(t, k) for t in tasks for k in range(group_size))))


async def _uncancellable(coro) -> None:
    """Await ``coro`` to completion even if the caller is cancelled meanwhile (teardown must
    finish); a cancellation that arrived is re-raised afterwards."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
