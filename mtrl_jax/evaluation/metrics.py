"""One definition of each metric, and the play of a task set that they are computed on.

The trainer's validation (``val/...``, ``test/...``), :class:`MultiTurnRLEvaluator`
(``eval/<model>/...``), ``mtrl reward-audit`` and the training rollouts (``rollout/...``) all call
these functions, so a metric of one name means one thing everywhere.

The play (:func:`play_task_set`): one greedy episode per task and ``num_samples`` sampled ones at
the validation temperature, with keys derived from one seed only (the same seed, tasks and
weights give the same episodes, whoever plays them).

Per set of episodes (:func:`episode_metrics`; the play reports it for ``greedy/`` and
``sampled/`` separately, never pooled):

==============================  ==============================================================
``strict_success``               mean strict score (the external evaluation: exact match of
                                 every expected field) over the episodes that *have* one (tasks
                                 with expected fields); absent when none has
``reward/mean``, ``/std``,       the environment's reward (what RL optimises)
``/zero_frac``
``completion_rate``              share that ended with a final answer
``max_turns_frac``               share that used up the turn budget
``truncated_frac``               share of *turns* cut by the per-turn token budget
``error_frac``                   share that ended in an environment or sampler error
``turns/mean``                   assistant turns per episode
``tokens/response_mean|max``     sampled tokens per episode
``tokens/context_mean``          tokens of the whole episode (prompt, tools, answers)
``tool_calls/mean``,             tool calls per episode (in all, per tool)
``tool_calls/<tool>``
``tool_error_rate``              share of tool calls that failed
``format_errors/mean``           malformed tool calls per episode
``format_compliance``            share of episodes without a malformed tool call
``template_rewrites``            chat-template history rewrites (count)
``tool_truncations/mean``        tool messages cut by the tool-result caps, per episode
``field_acc``, ``field/<name>``  the reward's per-field accuracy, where it reports one
==============================  ==============================================================

Per play (:func:`play_metrics`), over the ``num_samples`` sampled episodes per task (unbiased
pass@k, Chen et al. 2021): ``strict_pass_k_{k}`` (a sample passes when its strict score is 1)
and ``reward_pass_k_{k}`` (when its reward is ``>= success_threshold``), for ``k`` in
1, 2, 4, 8, 16 and ``num_samples`` (up to ``num_samples``); and
``reward_strict_disagreements``: greedy and sampled episodes whose thresholded reward and strict
score disagree (count).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from mtrl_jax.envs.base import Task
from mtrl_jax.kernels import pass_at_k
from mtrl_jax.rollout.trajectory import Trajectory

PASS_KS = (1, 2, 4, 8, 16)
EVAL_STREAM = 0x65766C  # the evaluation's own random stream (see play_task_set)
PROGRESS_EVERY_S = 5.0


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def metric_safe(name: str, limit: int = 64) -> str:
    """A model-written name (a tool it called, possibly invented: ``(calculator)``) as a metric
    name component: characters other than letters, digits, ``_ . -`` become ``_``; cut to
    ``limit`` characters. MLflow rejects a metric name with other characters, which once ended
    a run at step 8 of 10 (experiments/LOG.md, 2026-12-02)."""
    return _UNSAFE.sub("_", str(name))[:limit] or "_"


def is_strict_success(t: Trajectory) -> bool:
    return t.strict_score is not None and t.strict_score >= 1.0


def disagrees(t: Trajectory, success_threshold: float) -> bool:
    """The reward (``>= success_threshold``) and the strict score call the episode differently
    (episodes without a strict score never disagree)."""
    return t.strict_score is not None and (t.reward >= success_threshold) != is_strict_success(t)


def episode_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Metrics of a set of episodes (see the module docstring); ``{}`` for an empty set."""
    if not trajs:
        return {}
    rewards = np.array([t.reward for t in trajs], np.float64)
    turns = sum(t.num_turns for t in trajs)
    calls = [c for t in trajs for c in t.tool_calls]
    resp = [t.num_sampled_tokens for t in trajs]
    n = len(trajs)
    m = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "reward/zero_frac": float((rewards == 0).mean()),
        "completion_rate": sum(t.finish_reason == "answered" for t in trajs) / n,
        "max_turns_frac": sum(t.finish_reason == "max_turns" for t in trajs) / n,
        "truncated_frac": sum(t.truncated_turns for t in trajs) / max(1, turns),
        "error_frac": sum(t.finish_reason == "error" for t in trajs) / n,
        "turns/mean": turns / n,
        "tokens/response_mean": float(np.mean(resp)),
        "tokens/response_max": float(max(resp)),
        "tokens/context_mean": float(np.mean([sum(len(s) for s in t.samples) for t in trajs])),
        "tool_calls/mean": len(calls) / n,
        "tool_error_rate": sum(c.error is not None for c in calls) / max(1, len(calls)),
        "format_errors/mean": sum(t.format_errors for t in trajs) / n,
        "format_compliance": sum(t.format_errors == 0 for t in trajs) / n,
        "template_rewrites": float(sum(t.template_rewrites for t in trajs)),
        "tool_truncations/mean": sum(t.truncated_tool_results for t in trajs) / n,
    }
    for name, count in sorted(Counter(metric_safe(c.name) for c in calls).items()):
        m[f"tool_calls/{name}"] = count / n
    scored = [t.strict_score for t in trajs if t.strict_score is not None]
    if scored:
        m["strict_success"] = float(np.mean([s >= 1.0 for s in scored]))
    accs = [t.reward_metrics["field_acc"] for t in trajs if "field_acc" in t.reward_metrics]
    if accs:
        m["field_acc"] = float(np.mean(accs))
    fields = sorted({k for t in trajs for k in t.reward_metrics if k.startswith("field/")})
    for f in fields:
        m[f] = float(np.mean([t.reward_metrics.get(f, 0.0) for t in trajs]))
    return m


@dataclasses.dataclass
class Play:
    """The episodes of one play of a task set: ``greedy`` (one per task) and ``sampled``
    (``num_samples`` per task, task-major), both in the order of ``tasks``."""

    tasks: list[Task]
    greedy: list[Trajectory]
    sampled: list[Trajectory]
    num_samples: int
    seconds: float = 0.0

    @property
    def episodes(self) -> list[Trajectory]:
        return self.greedy + self.sampled


def play_task_set(runner, tasks: Sequence[Task], *, seed: int, num_samples: int,
                  temperature: float, max_tokens: int, greedy: bool = True, tag: str = "eval",
                  progress: Callable[[str], None] | None = None) -> Play:
    """Play ``tasks`` with ``runner`` (:class:`~mtrl_jax.rollout.runner.RolloutRunner`):
    one greedy episode per task (unless ``greedy=False``) and ``num_samples`` sampled at
    ``temperature``; ``max_tokens`` per turn. Keys: ``fold_in(key(seed), EVAL_STREAM)``, folded
    with 0 for the greedy episodes and 1 for the sampled ones (a stream of its own: training
    rollouts use ``fold_in(key(seed), step)``). ``progress(line)`` gets a line at most every
    ``PROGRESS_EVERY_S`` seconds and at the end of each phase."""
    import jax

    tasks = list(tasks)
    key = jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)
    t0 = time.perf_counter()
    last = [t0]

    def report(kind: str):
        if progress is None:
            return None

        def cb(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                progress(f"{tag}: {done}/{total} {kind} episodes ({now - t0:.0f} s)")

        return cb

    g: list[Trajectory] = []
    if greedy:
        g = runner.run_episodes(tasks, 1, jax.random.fold_in(key, 0),
                                sampling=runner.sampling(0.0, max_tokens), tag=f"{tag}g",
                                progress=report("greedy"))
    s: list[Trajectory] = []
    if num_samples > 0:
        s = runner.run_episodes(tasks, num_samples, jax.random.fold_in(key, 1),
                                sampling=runner.sampling(temperature, max_tokens),
                                tag=f"{tag}s", progress=report("sampled"))
    return Play(tasks, g, s, num_samples, time.perf_counter() - t0)


def pass_ks(n: int) -> list[int]:
    return sorted({k for k in PASS_KS if k <= n} | ({n} if n > 0 else set()))


def play_metrics(play: Play, success_threshold: float) -> dict[str, float]:
    """``greedy/<metric>``, ``sampled/<metric>`` (:func:`episode_metrics`), pass@k on the
    strict score and on the reward, and the disagreement count (see the module docstring)."""
    m = {f"greedy/{k}": v for k, v in episode_metrics(play.greedy).items()}
    m.update({f"sampled/{k}": v for k, v in episode_metrics(play.sampled).items()})
    n = play.num_samples
    if play.sampled:
        by_task = np.array([[is_strict_success(t), t.reward >= success_threshold]
                            for t in play.sampled]).reshape(len(play.tasks), n, 2)
        scored = np.array([t.expected is not None and bool(t.expected) for t in play.tasks])
        for k in pass_ks(n):
            if scored.any():
                m[f"strict_pass_k_{k}"] = float(np.mean(
                    [pass_at_k(n, int(row[:, 0].sum()), k) for row in by_task[scored]]))
            m[f"reward_pass_k_{k}"] = float(np.mean(
                [pass_at_k(n, int(row[:, 1].sum()), k) for row in by_task]))
    m["reward_strict_disagreements"] = float(sum(disagrees(t, success_threshold)
                                                 for t in play.episodes))
    return m


def per_task_scores(play: Play) -> dict[str, list[float]]:
    """Per task, for paired comparisons (bootstrap over tasks): ``greedy/strict_success`` and
    ``sampled/strict_success`` (tasks with expected fields only, in task order),
    ``greedy/reward/mean`` (every task)."""
    n = play.num_samples
    scored = [i for i, t in enumerate(play.tasks) if t.expected]
    out = {"greedy/strict_success": [float(is_strict_success(play.greedy[i])) for i in scored]
           if play.greedy else [],
           "greedy/reward/mean": [t.reward for t in play.greedy]}
    if play.sampled:
        out["sampled/strict_success"] = [
            float(np.mean([is_strict_success(t) for t in play.sampled[i * n:(i + 1) * n]]))
            for i in scored]
    return out


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.960)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t95 needs at least 1 degree of freedom, got {df}")
    return _T95[df - 1] if df <= len(_T95) else 1.960


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% confidence interval ``(mean, low, high)`` of independent values (seeds),
    by Student's t. Needs at least two values: one seed has no spread to report."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"mean_ci needs at least 2 values, got {x.size}")
    mean = float(x.mean())
    half = t95(x.size - 1) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return mean, mean - half, mean + half
