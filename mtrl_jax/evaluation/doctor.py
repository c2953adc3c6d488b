"""``mtrl doctor``: name the known failure patterns in a run's metric history.

Each rule reads the metrics the trainer logs (``rollout/reward/mean``,
``val/greedy/strict_success``, ``analysis/zero_adv_groups``, ``rollout/truncated_frac``,
``rollout/completion_rate``, ...; definitions in :mod:`mtrl_jax.evaluation.metrics`) and,
when its pattern is there, says what it saw (with the numbers), the first thing to change, and
the metric that confirms the diagnosis. Rules are plain functions of the history, so each one is
tested on a synthetic history showing its pattern and on a healthy one that must not trigger it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

History = dict[str, list[tuple[int, float]]]  # metric -> [(step, value)]


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    seen: str          # what the history shows, with numbers
    first_change: str  # the first thing to change
    confirm: str       # the metric that confirms it (or shows the fix worked)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _series(h: History, name: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((s, v) for s, v in h.get(name, []) if v is not None and np.isfinite(v))
    if not pts:
        return np.zeros(0, np.int64), np.zeros(0)
    s, v = zip(*pts, strict=True)
    return np.asarray(s), np.asarray(v, np.float64)


def _smooth(v: np.ndarray, w: int = 5) -> np.ndarray:
    if len(v) < w:
        return v
    return np.convolve(v, np.ones(w) / w, mode="valid")


def _reward(h: History) -> np.ndarray:
    return _series(h, "rollout/reward/mean")[1]


# ------------------------------------------------------------------------------ the rules


def reward_flat_from_start(h: History) -> Finding | None:
    r = _reward(h)
    if len(r) < 5 or np.ptp(r) > 1e-6 + 0.01 * max(1.0, abs(float(r.mean()))):
        return None
    zero = _series(h, "rollout/reward/zero_frac")[1]
    fmt = _series(h, "rollout/format_errors/mean")[1]
    extra = ""
    if len(zero):
        extra += f"; {zero.mean():.0%} of episodes score exactly 0"
    if len(fmt):
        extra += f"; {fmt.mean():.2f} format errors per episode"
    return Finding(
        "reward_flat_from_start",
        f"training reward constant at {r.mean():.3f} over all {len(r)} steps{extra}",
        "check that the model's output format matches what the reward parses: read a sampled "
        "trajectory (MLflow trace) next to the reward function; fix the parser or the prompt",
        "rollout/reward/zero_frac and rollout/format_errors/mean fall; rollout/reward/std > 0")


def uniform_groups(h: History) -> Finding | None:
    _, z = _series(h, "analysis/zero_adv_groups")
    if len(z) < 3:
        return None
    recent = z[len(z) // 2:]
    if recent.mean() <= 0.5:
        return None
    return Finding(
        "uniform_groups",
        f"{recent.mean():.0%} of groups score the same for every sample (mean of the last "
        f"{len(recent)} steps): those groups give no gradient",
        "use a smaller rollout.group_size and a larger rollout.batch_size (more distinct tasks "
        "per step), or tasks of more varied difficulty",
        "analysis/zero_adv_groups falls")


def reward_hacking(h: History) -> Finding | None:
    r = _reward(h)
    _, val = _series(h, "val/greedy/strict_success")
    if len(r) < 9 or len(val) < 2:
        return None
    third = len(r) // 3
    gain = r[-third:].mean() - r[:third].mean()
    if gain < max(0.05, 3 * r[:third].std() / np.sqrt(third)):
        return None
    if val[-1] - val[0] > 0.02:
        return None
    _, dis = _series(h, "val/reward_strict_disagreements")
    extra = f"; reward/strict disagreements {dis[0]:.0f} -> {dis[-1]:.0f}" if len(dis) else ""
    return Finding(
        "reward_hacking",
        f"training reward rose by {gain:+.3f} while validation strict success stayed at "
        f"{val[0]:.3f} -> {val[-1]:.3f}{extra}",
        "read the validation trajectories where reward and strict score disagree (MLflow traces "
        "*_disagreement) and tighten the reward parser until it agrees with the evaluation",
        "val/reward_strict_disagreements falls and val/greedy/strict_success follows the reward")


def reward_collapse(h: History) -> Finding | None:
    steps, r = _series(h, "rollout/reward/mean")
    sm = _smooth(r)
    if len(sm) < 15:
        return None
    peak = int(np.argmax(sm))
    drop = sm[peak] - sm[-1]
    if peak < 8 or len(sm) - peak < 5 or drop < max(0.1, 0.25 * abs(sm[peak])):
        return None
    return Finding(
        "reward_collapse",
        f"reward (5-step mean) peaked at {sm[peak]:.3f} near step {steps[peak + 2]} and fell to "
        f"{sm[-1]:.3f}",
        "set async_config.max_steps_off_policy=0 (on-policy data); if the loss is CISPO, move "
        "to PPO with clip (0.8, 1.2) (algorithm.loss={name: ppo, clip_low: 0.2, clip_high: 0.2}); "
        "resume from the checkpoint before the peak",
        "rollout/reward/mean holds its level; train/is_weight_max and train/clip_frac stay low")


def truncated_turns(h: History) -> Finding | None:
    _, t = _series(h, "rollout/truncated_frac")
    if len(t) < 3:
        return None
    recent = t[-10:]
    if recent.mean() <= 0.05:
        return None
    return Finding(
        "truncated_turns",
        f"{recent.mean():.1%} of turns hit rollout.sampling_max_tokens (last {len(recent)} "
        "steps; more than 5%)",
        "raise rollout.sampling_max_tokens (and max_context_tokens if needed)",
        "rollout/truncated_frac below 0.05")


def low_completion(h: History) -> Finding | None:
    for prefix in ("val/greedy", "rollout"):
        _, c = _series(h, f"{prefix}/completion_rate")
        if len(c) >= 2:
            break
    else:
        return None
    if c[-1] >= 0.8:
        return None
    _, mt = _series(h, f"{prefix}/max_turns_frac")
    why = f"; {mt[-1]:.0%} end at max_turns" if len(mt) else ""
    return Finding(
        "low_completion",
        f"only {c[-1]:.0%} of {prefix} episodes end with a final answer{why}: the agent does "
        "not finish, before it can be right",
        "give it room to finish: raise rollout.max_turns / sampling_max_tokens, or reward "
        "answering (check the stop token and the answer format first)",
        f"{prefix}/completion_rate rises (then look at task success)")


def low_correctness(h: History) -> Finding | None:
    _, c = _series(h, "val/greedy/completion_rate")
    _, s = _series(h, "val/greedy/strict_success")
    if len(c) < 2 or len(s) < 2 or c[-1] < 0.9:
        return None
    if s[-1] >= 0.2 or s[-1] - s[0] > 0.05:
        return None
    return Finding(
        "low_correctness",
        f"episodes complete ({c[-1]:.0%}) but strict success stays low ({s[0]:.3f} -> "
        f"{s[-1]:.3f}): a correctness problem, not a format or budget one",
        "check that the base model has a foothold (any strict successes: mtrl reward-audit), "
        "then a denser reward, an easier curriculum or a larger model",
        "val/greedy/strict_success and val/greedy/field_acc rise")


def slow_stall(h: History) -> Finding | None:
    r = _reward(h)
    if len(r) < 20:
        return None
    if any(rule(h) for rule in (reward_flat_from_start, uniform_groups, reward_collapse,
                                reward_hacking)):
        return None  # not a *healthy* stall
    half = r[len(r) // 2:]
    slope = np.polyfit(np.arange(len(half)), half, 1)[0]
    total = slope * len(half)
    if abs(total) > max(0.02, 0.05 * abs(float(half.mean()))) or half.mean() > 0.9:
        return None
    _, g = _series(h, "train/grad_norm")
    if len(g) and not (np.all(np.isfinite(g)) and g[-len(half):].mean() > 0):
        return None
    return Finding(
        "slow_stall",
        f"reward has stayed near {half.mean():.3f} for the last {len(half)} steps (change "
        f"{total:+.3f}) with healthy signals (varied groups, finite gradients, no collapse)",
        "double lora.lora_rank and lora.lora_alpha (more adapter capacity)",
        "rollout/reward/mean climbs again within tens of steps")


RULES: tuple[Callable[[History], Finding | None], ...] = (
    reward_flat_from_start, uniform_groups, reward_hacking, reward_collapse, truncated_turns,
    low_completion, low_correctness, slow_stall)


def diagnose(history: History) -> list[Finding]:
    """Every known failure pattern found in ``history`` (empty for a healthy run)."""
    return [f for rule in RULES if (f := rule(history)) is not None]


# ------------------------------------------------------------------------------ MLflow


def load_history(run: str, tracking_uri: str | None = None) -> tuple[History, str]:
    """A run's metric history: ``run`` is a run folder (its ``mlflow.db``; the newest run in it)
    or a run id (``tracking_uri`` or ``$MLFLOW_TRACKING_URI``). Returns ``(history, run_id)``."""
    from mtrl_jax.tracking.mlflow import read_run_history

    return read_run_history(run, tracking_uri)
