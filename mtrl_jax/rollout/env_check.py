"""``mtrl env-check <task>``: prove an environment before training on it.

Plays the task's split through the real agent loop with two scripted policies, each twice with
the same seeds: the family's oracle (solves every task through the tools) and a random policy
(random tools, plausible or junk arguments, a random answer). It reports, per policy: strict
success (the oracle must reach 1.0, random stays near 0), mean reward, finish reasons, tool
calls, tool error rate, timings, and how many episodes crashed (``finish_reason == "error"``:
an exception in ``setup``, ``reward`` or ``teardown``) with each distinct exception, one example
episode and its traceback. It also checks that identical tool calls got identical results
across the two runs (hermetic tools).

By default every task of the split is played; with ``n`` smaller than the split, a seeded
sample of ``n`` tasks is, and the report says so.

``reference``: a module (dotted name or ``.py`` file, optionally ``:ClassName``, instantiated
with no arguments) whose functions or methods are named like the tools -- e.g. a benchmark's own
tool code. Every tool call the policies made is repeated on it with the same arguments, and its
answer, ``json.dumps(result)`` or ``Error: <message>`` for an exception (the convention of
SOP-Bench's tools), is compared with the replayed tool's answer, per tool.

It lives with the agent loop it drives (``mtrl_jax.envs`` imports nothing from ``rollout``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import json
import random
import time
from typing import Any

from mtrl_jax.envs.base import Task
from mtrl_jax.envs.families import (
    final_output_text,
    import_user_module,
    load_tasks,
    make_env,
    oracle_turns,
    strict_task_score,
    tool_call_text,
)
from mtrl_jax.models.tokenizer import build_byte_tokenizer
from mtrl_jax.rollout.agent_loop import AgentLoop, AgentLoopConfig
from mtrl_jax.rollout.sampler import ScriptedSampler
from mtrl_jax.rollout.trajectory import ToolCallRecord, Trajectory

#: How much of a crash's traceback the report keeps (its last lines: where it was raised).
TRACEBACK_LINES = 12
MAX_EXAMPLES = 10


@dataclasses.dataclass
class Crash:
    """One distinct exception that ended episodes: ``error`` is its last line
    (``ValueError: ...``), ``count`` the episodes it ended, one ``example_episode`` and the end
    of its ``traceback``."""

    error: str
    count: int
    example_episode: str
    traceback: str


@dataclasses.dataclass
class PolicyReport:
    strict_success: float
    mean_reward: float
    finish_reasons: dict[str, int]
    tool_calls: dict[str, int]
    tool_error_rate: float
    seconds: float
    episodes_per_s: float
    crashes: int = 0
    crash_causes: list[Crash] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ToolMatch:
    """How many calls of one tool the reference answered exactly as the replay did."""

    calls: int = 0
    matches: int = 0


@dataclasses.dataclass
class ReferenceMismatch:
    tool: str
    arguments: Any
    replay: str
    reference: str
    episode: str


@dataclasses.dataclass
class ReferenceReport:
    reference: str
    tools: dict[str, ToolMatch]
    not_in_reference: list[str]
    mismatches: list[ReferenceMismatch]

    @property
    def calls(self) -> int:
        return sum(t.calls for t in self.tools.values())

    @property
    def matches(self) -> int:
        return sum(t.matches for t in self.tools.values())

    @property
    def all_match(self) -> bool:
        return self.calls == self.matches


@dataclasses.dataclass
class EnvCheckReport:
    """Everything :func:`env_check` found; ``to_dict`` is JSON-serialisable."""

    task: str
    split: str
    n: int
    total: int
    seed: int
    oracle: PolicyReport
    random: PolicyReport
    deterministic: bool
    mismatches: list[str]
    reference: ReferenceReport | None = None

    @property
    def sampled(self) -> bool:
        return self.n < self.total

    @property
    def ok(self) -> bool:
        return (self.deterministic and self.oracle.strict_success == 1.0
                and self.oracle.crashes == 0 and self.random.crashes == 0
                and (self.reference is None or self.reference.all_match))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self) | {"ok": self.ok, "sampled": self.sampled}
        if self.reference is not None:
            out["reference"] |= {"calls": self.reference.calls,
                                 "matches": self.reference.matches}
        return out


def _random_turns(task: Task, tools: list[Any], rng: random.Random) -> list[str]:
    """A uniformly random agent: random tools with plausible-looking or junk arguments, then a
    final answer with random values."""
    values = [str(v) for v in (task.data.get("inputs") or {}).values()] + ["x", "1", "yes"]
    turns = []
    for _ in range(rng.randint(0, 3) if tools else 0):  # an environment may have no tools
        t = rng.choice(tools)
        props = t.parameters.get("properties", {})
        args = {k: rng.choice(values) for k in props if rng.random() < 0.8}
        turns.append(tool_call_text(t.name, args))
    fields = {k: rng.choice(["pass", "fail", "yes", "no", "0", "1", "match", "approve"])
              for k in (task.expected or {})}
    turns.append(final_output_text(fields))
    return turns


def _exception_line(error: str) -> str:
    lines = [ln for ln in error.strip().splitlines() if ln.strip()]
    return (lines[-1].strip() if lines else "unknown error")[:300]


def _crashes(trajs: list[Trajectory]) -> list[Crash]:
    by_cause: dict[str, Crash] = {}
    for t in trajs:
        if t.finish_reason != "error":
            continue
        error = t.error or "unknown error"
        cause = _exception_line(error)
        if cause in by_cause:
            by_cause[cause].count += 1
        else:
            tb = "\n".join(error.rstrip().splitlines()[-TRACEBACK_LINES:])
            by_cause[cause] = Crash(cause, 1, t.episode_id, tb)
    return sorted(by_cause.values(), key=lambda c: -c.count)


def _summarise(trajs: list[Trajectory], tasks: dict[str, Task], seconds: float) -> PolicyReport:
    calls = collections.Counter(c.name for t in trajs for c in t.tool_calls)
    n_calls = sum(calls.values())
    errors = sum(t.tool_error_count for t in trajs)
    strict = [strict_task_score(tasks[t.task_id], t.final_text) for t in trajs]
    causes = _crashes(trajs)
    return PolicyReport(
        strict_success=sum(strict) / max(len(strict), 1),
        mean_reward=sum(t.reward for t in trajs) / max(len(trajs), 1),
        finish_reasons=dict(collections.Counter(t.finish_reason for t in trajs)),
        tool_calls=dict(calls), tool_error_rate=errors / max(n_calls, 1),
        seconds=round(seconds, 3), episodes_per_s=round(len(trajs) / max(seconds, 1e-9), 1),
        crashes=sum(c.count for c in causes), crash_causes=causes)


async def _run(tasks: list[Task], turns: dict[str, list[str]], max_turns: int,
               reward: str | None) -> tuple[list[Trajectory], float]:
    tok = build_byte_tokenizer()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    by_episode = {t.id: turns[t.id] for t in tasks}
    sampler = ScriptedSampler(
        tok, lambda eid, turn, _: by_episode[eid][min(turn, len(by_episode[eid]) - 1)], stop)
    # budgets far above any recipe's, so the check sees the environment's own answers (and
    # compares them with a reference) whole; results are still capped at the context budget
    # (a longer one could not fit anyway), so a runaway tool cannot exhaust memory here
    loop = AgentLoop(tok, sampler, AgentLoopConfig(max_turns=max_turns,
                                                   sampling_max_tokens=4096,
                                                   max_context_tokens=1 << 20,
                                                   max_tool_result_bytes=1 << 20,
                                                   max_tool_result_tokens=1 << 20))
    t0 = time.perf_counter()
    trajs = await asyncio.gather(*(loop.run(make_env(t, reward), t, episode_id=t.id)
                                   for t in tasks))
    return list(trajs), time.perf_counter() - t0


def load_reference(spec: str) -> Any:
    """The object whose attributes are the reference tools: the module ``spec`` names, or with
    ``:Name`` its attribute (a class is instantiated with no arguments)."""
    module_spec, _, attr = spec.partition(":")
    module = import_user_module(module_spec)
    if not attr:
        return module
    if not hasattr(module, attr):
        names = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ValueError(f"reference {spec!r}: {module_spec} has no {attr!r}; it has {names}")
    target = getattr(module, attr)
    return target() if inspect.isclass(target) else target


def _reference_answer(fn: Any, arguments: Any) -> str:
    """What the reference tool says, in the replay's convention: ``json.dumps(result)`` or
    ``Error: <message>``."""
    try:
        out = fn(**arguments) if isinstance(arguments, dict) else fn(arguments)
        if inspect.isawaitable(out):
            out = asyncio.run(out)
        return json.dumps(out)
    except Exception as e:
        return f"Error: {e}"


def compare_with_reference(spec: str,
                           calls: list[tuple[str, ToolCallRecord]]) -> ReferenceReport:
    """Repeat each ``(episode, call)`` on the reference ``spec`` and compare the answers."""
    ref = load_reference(spec)
    tools: dict[str, ToolMatch] = {}
    absent: set[str] = set()
    mismatches: list[ReferenceMismatch] = []
    per_tool_examples: collections.Counter[str] = collections.Counter()
    for episode, rec in calls:
        fn = getattr(ref, rec.name, None)
        if not callable(fn):
            absent.add(rec.name)
            continue
        answer = _reference_answer(fn, rec.arguments)
        stats = tools.setdefault(rec.name, ToolMatch())
        stats.calls += 1
        if answer == rec.result:
            stats.matches += 1
        elif per_tool_examples[rec.name] < 3 and len(mismatches) < MAX_EXAMPLES:
            per_tool_examples[rec.name] += 1
            mismatches.append(ReferenceMismatch(rec.name, rec.arguments, rec.result, answer,
                                                episode))
    return ReferenceReport(spec, dict(sorted(tools.items())), sorted(absent), mismatches)


def env_check(task_name: str, *, split: str = "test", n: int | None = None, seed: int = 0,
              max_turns: int = 6, reward: str | None = None,
              reference: str | None = None) -> EnvCheckReport:
    """Run the check (see the module docstring).

    Args:
      task_name: ``family:name``.
      split: the split to play.
      n: play a seeded sample of ``n`` tasks; None (default): every task of the split.
      seed: task generation, the sample and the random policy.
      max_turns: the agent loop's turn limit.
      reward: the reward kind (one of the family's; None: its default).
      reference: a reference implementation of the tools to compare with (module docstring).
    """
    everything = load_tasks(task_name, split=split, n=None, seed=seed)
    if not everything:
        raise ValueError(f"{task_name} has no tasks in split {split!r}")
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 (or None for every task), got {n}")
    tasks = everything
    if n is not None and n < len(everything):
        keep = sorted(random.Random(seed).sample(range(len(everything)), n))
        tasks = [everything[i] for i in keep]
    by_id = {t.id: t for t in tasks}
    if len(by_id) != len(tasks):
        raise ValueError(f"{task_name}: task ids repeat in split {split!r}; each must be unique")
    oracle = {t.id: oracle_turns(t) for t in tasks}
    rng = random.Random(seed)
    rand = {t.id: _random_turns(t, make_env(t, reward).tools(), rng) for t in tasks}

    runs = {}
    for name, turns in (("oracle", oracle), ("random", rand)):
        runs[name] = [asyncio.run(_run(tasks, turns, max_turns, reward)) for _ in range(2)]

    mismatches = []
    for name, ((a, _), (b, _)) in runs.items():
        for ta, tb in zip(a, b, strict=True):
            ra = [(c.name, json.dumps(c.arguments, sort_keys=True), c.result) for c in
                  ta.tool_calls]
            rb = [(c.name, json.dumps(c.arguments, sort_keys=True), c.result) for c in
                  tb.tool_calls]
            if ra != rb:
                mismatches.append(f"{name} {ta.task_id}: tool results differ between runs")
    ref_report = None
    if reference is not None:
        calls = [(t.episode_id, c) for name in ("oracle", "random") for t in runs[name][0][0]
                 for c in t.tool_calls]
        ref_report = compare_with_reference(reference, calls)
    return EnvCheckReport(
        task=task_name, split=split, n=len(tasks), total=len(everything), seed=seed,
        oracle=_summarise(runs["oracle"][0][0], by_id, runs["oracle"][0][1]),
        random=_summarise(runs["random"][0][0], by_id, runs["random"][0][1]),
        deterministic=not mismatches, mismatches=mismatches[:20], reference=ref_report)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def format_report(report: EnvCheckReport) -> str:
    """The report as ``mtrl env-check`` prints it (the last line is ``OK`` or ``FAILED``)."""
    o, r = report.oracle, report.random
    if report.sampled:
        scope = (f"{report.n} of {report.total} tasks, sampled with seed {report.seed}")
    else:
        scope = f"all {report.n} tasks"
    lines = [f"{report.task} ({report.split} split, {scope}; each policy run twice)"]
    for name, p in (("oracle", o), ("random", r)):
        line = (f"  {name}: strict success {p.strict_success:.3f}, mean reward "
                f"{p.mean_reward:.3f}, tool error rate {p.tool_error_rate:.3f}, "
                f"{p.episodes_per_s} episodes/s, {p.crashes} of {report.n} episodes crashed")
        lines.append(line)
        for c in p.crash_causes:
            lines.append(f"    {c.count} x {c.error}  (e.g. episode {c.example_episode})")
            lines.append(_indent(c.traceback, "      | "))
    lines.append(f"  oracle tool calls: {o.tool_calls}")
    lines.append(f"  random finish reasons: {r.finish_reasons}")
    lines.append(f"  identical tool results across runs: {report.deterministic}")
    lines += [f"    {m}" for m in report.mismatches]
    ref = report.reference
    if ref is not None:
        lines.append(f"  reference {ref.reference}: {ref.matches} of {ref.calls} tool results "
                     "match the replay")
        for tool, stats in ref.tools.items():
            lines.append(f"    {tool}: {stats.matches}/{stats.calls}")
        if ref.not_in_reference:
            lines.append(f"    not in the reference (not compared): {ref.not_in_reference}")
        for m in ref.mismatches:
            lines.append(f"    mismatch in {m.episode}: {m.tool}({json.dumps(m.arguments)})")
            lines.append(f"      replay:    {m.replay[:300]}")
            lines.append(f"      reference: {m.reference[:300]}")
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)
