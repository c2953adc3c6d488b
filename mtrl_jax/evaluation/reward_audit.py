"""``mtrl reward-audit``: before training, compare the recipe's reward with the strict scorer on
baseline rollouts.

RL optimises the reward literally. The audit plays the base policy on training tasks (the
recipe's group size and sampling) and reports how often reward and strict evaluation agree,
the episodes the reward credits but the strict scorer rejects (and the reverse), the share of
groups whose rewards are all equal (no learning signal), and whether the base has a foothold
(any strict successes). It never calls a reward safe when it is more lenient than the
evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from mtrl_jax.evaluation.metrics import disagrees, is_strict_success, play_task_set
from mtrl_jax.rollout.trajectory import Trajectory


@dataclasses.dataclass
class AuditReport:
    episodes: int
    groups: int
    threshold: float
    agreement: float                 # share of episodes where reward>=thr <=> strict success
    lenient: int                     # reward >= thr, strict failure
    strict_only: int                 # strict success, reward < thr
    equal_groups: float              # share of groups whose rewards are all equal
    strict_successes: int
    tasks_with_success: float        # share of tasks with >= 1 strict success
    reward_success_mean: float       # mean reward of strict successes (NaN if none)
    reward_failure_mean: float       # mean reward of strict failures (NaN if none)
    verdict: str                     # safe | lenient | no_foothold | no_signal
    reasons: list[str]
    lenient_examples: list[dict[str, Any]]
    strict_only_examples: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=float))


def _example(t: Trajectory) -> dict[str, Any]:
    return {"task_id": t.task_id, "episode_id": t.episode_id, "reward": t.reward,
            "strict": t.strict_score, "final_text": (t.final_text or "")[:300],
            "finish_reason": t.finish_reason}


def audit_trajectories(trajs: list[Trajectory], group_size: int,
                       threshold: float = 1.0, max_examples: int = 5) -> AuditReport:
    """The audit of task-major baseline trajectories (``group_size`` per task)."""
    scored = [t for t in trajs if t.strict_score is not None]
    if len(scored) != len(trajs):
        raise ValueError("every task needs expected fields for the strict scorer "
                         f"({len(trajs) - len(scored)} episodes have none)")
    if not trajs or len(trajs) % group_size:
        raise ValueError(f"{len(trajs)} episodes do not form groups of {group_size}")
    rewards = np.array([t.reward for t in trajs], np.float64)
    strict = np.array([is_strict_success(t) for t in trajs])
    lenient = [t for t in trajs if disagrees(t, threshold) and not is_strict_success(t)]
    strict_only = [t for t in trajs if disagrees(t, threshold) and is_strict_success(t)]
    groups = rewards.reshape(-1, group_size)
    equal = float(np.mean([np.ptp(g) == 0 for g in groups]))
    per_task = strict.reshape(-1, group_size).any(axis=1)
    reasons = []
    if lenient:
        reasons.append(f"the reward credits {len(lenient)} episode(s) the strict scorer "
                       "rejects: it is more lenient than the evaluation, and RL will exploit "
                       "that; tighten it until these agree")
    if not strict.any():
        reasons.append("no strict success in any baseline episode: the base has no foothold "
                       "(warm-start, an easier task mix, or a denser reward that still agrees "
                       "with the strict scorer)")
    if equal > 0.5:
        reasons.append(f"{equal:.0%} of groups score the same for every sample: little "
                       "learning signal (more varied tasks, a denser reward, another "
                       "group_size)")
    verdict = ("lenient" if lenient else "no_foothold" if not strict.any()
               else "no_signal" if equal > 0.5 else "safe")
    mean_or_nan = (lambda x: float(x.mean()) if len(x) else float("nan"))
    return AuditReport(
        episodes=len(trajs), groups=len(groups), threshold=threshold,
        agreement=1.0 - (len(lenient) + len(strict_only)) / len(trajs), lenient=len(lenient),
        strict_only=len(strict_only), equal_groups=equal, strict_successes=int(strict.sum()),
        tasks_with_success=float(per_task.mean()),
        reward_success_mean=mean_or_nan(rewards[strict]),
        reward_failure_mean=mean_or_nan(rewards[~strict]),
        verdict=verdict, reasons=reasons,
        lenient_examples=[_example(t) for t in lenient[:max_examples]],
        strict_only_examples=[_example(t) for t in strict_only[:max_examples]])


def reward_audit(recipe=None, overrides=None, *, n_tasks: int = 32, tasks=None, make_env=None,
                 adapter: str | None = None) -> AuditReport:
    """Play the base policy (or ``adapter``) on ``n_tasks`` training tasks, ``group_size``
    sampled episodes each at the training rollouts' temperature and budget
    (:func:`~mtrl_jax.evaluation.metrics.play_task_set`), and audit the reward against the
    strict scorer."""
    from mtrl_jax.config import load_config
    from mtrl_jax.envs.families import load_tasks
    from mtrl_jax.models.checkpoint import load_peft_adapter
    from mtrl_jax.rollout.runner import RolloutRunner, build_policy

    c = load_config(recipe, overrides)
    d = c.data
    if tasks is None:
        tasks = load_tasks(d.task, d.train_split, n_tasks, d.data_seed)
    tasks = list(tasks)[:n_tasks]
    if d.system_prompt == "none":
        tasks = [dataclasses.replace(t, system=None) for t in tasks]
    tokenizer, model = build_policy(c)
    if adapter is not None:
        load_peft_adapter(model, adapter)
    runner = RolloutRunner(c, tokenizer, model, make_env)
    try:
        play = play_task_set(runner, tasks, seed=c.seed, greedy=False,
                             num_samples=c.rollout.group_size,
                             temperature=c.rollout.temperature,
                             max_tokens=c.rollout.sampling_max_tokens, tag="audit")
    finally:
        runner.close()
    return audit_trajectories(play.sampled, c.rollout.group_size,
                              c.val_sampling_params.success_threshold)


def format_report(r: AuditReport) -> str:
    lines = [
        f"reward audit: {r.episodes} baseline episodes in {r.groups} groups "
        f"(success = reward >= {r.threshold:g})",
        f"  agreement with the strict scorer: {r.agreement:.1%}",
        f"  reward credits, strict rejects:   {r.lenient}",
        f"  strict accepts, reward does not:  {r.strict_only}",
        f"  groups with all-equal rewards:    {r.equal_groups:.1%}",
        f"  strict successes: {r.strict_successes} (tasks with one: {r.tasks_with_success:.1%})",
        f"  mean reward: strict successes {r.reward_success_mean:.3f}, failures "
        f"{r.reward_failure_mean:.3f}",
        f"verdict: {r.verdict.upper()}" + ("" if r.verdict != "safe" else
                                          " (no lenient case, a foothold, varied groups)"),
    ]
    lines += [f"  - {x}" for x in r.reasons]
    for name, ex in (("credited but rejected", r.lenient_examples),
                     ("accepted but not credited", r.strict_only_examples)):
        for e in ex:
            lines.append(f"  [{name}] {e['task_id']} reward {e['reward']:.3f}: "
                         f"{e['final_text'][:120]!r}")
    return "\n".join(lines)
