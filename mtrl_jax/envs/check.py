"""``mtrl env-check <task>``: prove an environment before training on it.

Runs a scripted oracle (solves every task through the tools) and a random policy, each twice
with the same seeds, and reports: strict success of each (oracle must be 1.0, random near 0),
whether identical tool calls got identical results across the two runs (hermetic tools), the
tool-call distribution, tool error rate and timings.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import time
from typing import Any

from mtrl_jax.envs.base import Task
from mtrl_jax.envs.families import (
    final_output_text,
    load_tasks,
    make_env,
    oracle_turns,
    strict_task_score,
    tool_call_text,
)
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.sampler import ScriptedSampler
from mtrl_jax.rollout.trajectory import Trajectory


@dataclasses.dataclass
class PolicyReport:
    strict_success: float
    mean_reward: float
    finish_reasons: dict[str, int]
    tool_calls: dict[str, int]
    tool_error_rate: float
    seconds: float
    episodes_per_s: float


@dataclasses.dataclass
class EnvCheckReport:
    task: str
    split: str
    n: int
    oracle: PolicyReport
    random: PolicyReport
    deterministic: bool
    mismatches: list[str]

    @property
    def ok(self) -> bool:
        return self.deterministic and self.oracle.strict_success == 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ok": self.ok}


def _random_turns(task: Task, tools: list[Any], rng: random.Random) -> list[str]:
    """A uniformly random agent: random tools with plausible-looking or junk arguments, then a
    final answer with random values."""
    values = [str(v) for v in (task.data.get("inputs") or {}).values()] + ["x", "1", "yes"]
    turns = []
    for _ in range(rng.randint(0, 3)):
        t = rng.choice(tools)
        props = t.parameters.get("properties", {})
        args = {k: rng.choice(values) for k in props if rng.random() < 0.8}
        turns.append(tool_call_text(t.name, args))
    fields = {k: rng.choice(["pass", "fail", "yes", "no", "0", "1", "match", "approve"])
              for k in (task.expected or {})}
    turns.append(final_output_text(fields))
    return turns


def _summarise(trajs: list[Trajectory], tasks: dict[str, Task], seconds: float) -> PolicyReport:
    calls = collections.Counter(c.name for t in trajs for c in t.tool_calls)
    n_calls = sum(calls.values())
    errors = sum(t.tool_error_count for t in trajs)
    strict = [strict_task_score(tasks[t.task_id], t.final_text) for t in trajs]
    return PolicyReport(
        strict_success=sum(strict) / max(len(strict), 1),
        mean_reward=sum(t.reward for t in trajs) / max(len(trajs), 1),
        finish_reasons=dict(collections.Counter(t.finish_reason for t in trajs)),
        tool_calls=dict(calls), tool_error_rate=errors / max(n_calls, 1),
        seconds=round(seconds, 3), episodes_per_s=round(len(trajs) / max(seconds, 1e-9), 1))


async def _run(tasks: list[Task], turns: dict[str, list[str]], max_turns: int) -> tuple[
        list[Trajectory], float]:
    tok = build_byte_tokenizer()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    by_episode = {t.id: turns[t.id] for t in tasks}
    sampler = ScriptedSampler(
        tok, lambda eid, turn, _: by_episode[eid][min(turn, len(by_episode[eid]) - 1)], stop)
    loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=max_turns,
                                                   sampling_max_tokens=4096,
                                                   max_context_tokens=1 << 20))
    t0 = time.perf_counter()
    trajs = await asyncio.gather(*(loop.run(make_env(t), t, episode_id=t.id) for t in tasks))
    return list(trajs), time.perf_counter() - t0


def env_check(task_name: str, *, split: str = "test", n: int = 50, seed: int = 0,
              max_turns: int = 6) -> EnvCheckReport:
    """Run the check (see the module docstring)."""
    tasks = load_tasks(task_name, split=split, n=n, seed=seed)
    if not tasks:
        raise ValueError(f"{task_name} has no tasks in split {split!r}")
    by_id = {t.id: t for t in tasks}
    oracle = {t.id: oracle_turns(t) for t in tasks}
    rng = random.Random(seed)
    rand = {t.id: _random_turns(t, make_env(t).tools(), rng) for t in tasks}

    runs = {}
    for name, turns in (("oracle", oracle), ("random", rand)):
        runs[name] = [asyncio.run(_run(tasks, turns, max_turns)) for _ in range(2)]

    mismatches = []
    for name, ((a, _), (b, _)) in runs.items():
        for ta, tb in zip(a, b, strict=True):
            ra = [(c.name, json.dumps(c.arguments, sort_keys=True), c.result) for c in
                  ta.tool_calls]
            rb = [(c.name, json.dumps(c.arguments, sort_keys=True), c.result) for c in
                  tb.tool_calls]
            if ra != rb:
                mismatches.append(f"{name} {ta.task_id}: tool results differ between runs")
    return EnvCheckReport(
        task=task_name, split=split, n=len(tasks),
        oracle=_summarise(runs["oracle"][0][0], by_id, runs["oracle"][0][1]),
        random=_summarise(runs["random"][0][0], by_id, runs["random"][0][1]),
        deterministic=not mismatches, mismatches=mismatches[:20])
