"""Every recipe setting reaches its kernel: one trainer step for every estimator x loss pair,
with spies on the kernel calls, and the settings that must change the loss do change it.

The steps train on replayed multi-turn episodes (literal byte tokens, per-turn rewards that
differ within each group, behaviour log-probs far from the policy's on some tokens) so that every
estimator has signal and every TIS mode has weights to cut. Each step makes two optimizer
updates (``optimizer.epochs=2``), so the second sees ratios off 1 (clipping, KL to the base).
A step is run once per recipe and shared by the tests that read it (each distinct loss is a
program to compile).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from mtrl_jax.envs.base import Task
from mtrl_jax.kernels import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    CISPOParams,
    GroupBasedParams,
    GSPOParams,
    ISParams,
    LossConfig,
    OPOParams,
    PassKParams,
    PerTurnParams,
    PPOParams,
    ReinforcePPParams,
    RLOOParams,
    TISParams,
)
from mtrl_jax.rollout.sources import StepRollout
from mtrl_jax.rollout.trajectory import Sample, Trajectory
from mtrl_jax.training import batch as batch_mod
from mtrl_jax.training import update as update_mod
from mtrl_jax.training.trainer import MultiTurnRLTrainer
from tests.test_trainer import TINY

#: per kernel: recipe parameters (none at their defaults) and the dataclass they must become
ADVANTAGES = {
    "group_based": ({"normalize_by_std": False, "std_ddof": 0}, GroupBasedParams(False, 0)),
    "rloo": ({}, RLOOParams()),
    "grpo_passk": ({"k": 2, "eps": 1e-3}, PassKParams(k=2, eps=1e-3)),
    "group_based_per_turn": ({"gamma": 0.5, "std_ddof": 0}, PerTurnParams(0.5, std_ddof=0)),
    "reinforce_pp_baseline": ({"eps": 1e-3}, ReinforcePPParams(eps=1e-3)),
    "opo": ({}, OPOParams()),
}
LOSSES = {
    "ppo": ({"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 3.0},
            PPOParams(0.1, 0.3, dual_clip=3.0)),
    "cispo": ({"clip_high": 0.4}, CISPOParams(clip_high=0.4)),
    "is": ({"max_weight": 1.5}, ISParams(max_weight=1.5)),
    "gspo": ({"clip_low": 1e-3, "clip_high": 2e-3}, GSPOParams(1e-3, 2e-3)),
}
BASE = TINY + ["eval_interval=0", "checkpoint_interval=0", "tracker=memory",
               "rollout.max_turns=2", "optimizer.epochs=2", "optimizer.learning_rate=0.2"]


def test_the_matrix_covers_every_registered_kernel():
    assert sorted(ADVANTAGES) == ADVANTAGE_ESTIMATORS.names()
    assert sorted(LOSSES) == POLICY_LOSSES.names()


def _episode(task: Task, k: int, step: int) -> Trajectory:
    """Two turns of byte tokens; the per-turn rewards and lengths vary with ``k``."""
    s = Sample()
    s.add_context([60 + k, 61, 62, 63], 0, step)
    s.add_sampled([70 + k] * (2 + k), [-9.0 if j % 2 else -3.0 for j in range(2 + k)], 0, step)
    s.add_context([64, 65], 1, step)
    s.add_sampled([80 + k] * (3 + k % 2), [-4.0] * (3 + k % 2), 1, step)
    turn_rewards = [0.25 * (k % 2), 0.5 * (k // 2)]
    return Trajectory(task_id=task.id, episode_id=f"s{step}/{task.id}#{k}", samples=[s],
                      messages=[], finish_reason="answered", num_turns=2,
                      reward=sum(turn_rewards), turn_rewards=turn_rewards,
                      group_id=task.id, final_text="x")


class ReplaySource:
    """A rollout source of scripted episodes (the protocol of mtrl_jax.rollout.sources)."""

    def start(self, version, lora, *, tasks_for, first_step, last_step, base_fingerprint=None):
        self.tasks_for = tasks_for

    def episodes(self, step: int) -> StepRollout:
        trajs = [_episode(t, k, step) for t in self.tasks_for(step) for k in range(4)]
        return StepRollout(trajs, {"worker": -1, "attempt": 0, "start_version": step}, {}, 1.0)

    def publish(self, version, lora):
        pass

    def close(self):
        pass


def _tasks():
    return [Task(id=f"t{i}", family="custom", name="replay", prompt=".", split="train")
            for i in range(4)]


@dataclasses.dataclass
class Step:
    """One trainer step of a recipe and what the kernels were called with."""

    metrics: dict[str, float]
    advantage_calls: list  # (name, params, rewards shape, lengths given)
    loss_calls: list       # (name, params, LossConfig, PolicyLossInputs)


_STEPS: dict[tuple[str, ...], Step] = {}


def run_step(tmp_path_factory, *overrides: str) -> Step:
    """A trainer step with ``overrides`` on the replayed episodes, spies on the advantage and
    loss kernels; memoised per recipe."""
    if overrides in _STEPS:
        return _STEPS[overrides]
    calls: dict[str, list] = {"advantage": [], "loss": []}
    real_adv, real_loss = batch_mod.compute_advantages, update_mod.policy_loss

    def adv_spy(method, rewards, valid=None, *, params=None, lengths=None):
        calls["advantage"].append((method, params, tuple(rewards.shape), lengths is not None))
        return real_adv(method, rewards, valid, params=params, lengths=lengths)

    def loss_spy(name, inputs, params=None, config=None, **kw):
        calls["loss"].append((name, params, config, inputs))
        return real_loss(name, inputs, params, config, **kw)

    batch_mod.compute_advantages, update_mod.policy_loss = adv_spy, loss_spy
    try:
        out = tmp_path_factory.mktemp("step")
        t = MultiTurnRLTrainer(overrides=BASE + [f"output_dir={out}", "steps=1", *overrides],
                               train_tasks=_tasks(), make_env=lambda t: None,
                               rollout_source=ReplaySource(), verbose=False)
        m = t.train_step()
        t.close()
    finally:
        batch_mod.compute_advantages, update_mod.policy_loss = real_adv, real_loss
    _STEPS[overrides] = Step(m, calls["advantage"], calls["loss"])
    return _STEPS[overrides]


def _yaml(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def _matrix_recipe(adv: str, loss: str) -> tuple[str, str]:
    return (f"algorithm.advantage={_yaml({'name': adv, **ADVANTAGES[adv][0]})}",
            f"algorithm.loss={_yaml({'name': loss, **LOSSES[loss][0]})}")


@pytest.mark.parametrize("adv, loss", list(itertools.product(ADVANTAGES, LOSSES)))
def test_each_estimator_and_loss_receive_exactly_the_recipes_parameters(tmp_path_factory, adv,
                                                                        loss):
    step = run_step(tmp_path_factory, *_matrix_recipe(adv, loss))
    m = step.metrics
    assert math.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0
    [(name, params, shape, with_lengths)] = step.advantage_calls
    assert (name, params) == (adv, ADVANTAGES[adv][1])
    assert shape == ((2, 4, 2) if adv == "group_based_per_turn" else (2, 4))
    assert with_lengths == (adv == "opo")
    # traced once per mini-batch shape, always with exactly these
    assert {(n, p) for n, p, _, _ in step.loss_calls} == {(loss, LOSSES[loss][1])}
    assert {c for _, _, c, _ in step.loss_calls} == {LossConfig(tis=TISParams(mode="none"))}
    assert m["analysis/zero_adv_groups"] < 1.0  # the estimator saw signal


DEFAULT = LossConfig()
#: (a setting, the LossConfig it must reach the loss as -- None: the default -- and the
#: setting it must give another loss than)
SETTINGS = [
    (["algorithm.aggregation=seq_mean_token_mean"],
     LossConfig(aggregation="seq_mean_token_mean"), []),
    (["algorithm.aggregation=seq_mean_token_sum"], LossConfig(aggregation="seq_mean_token_sum"),
     []),
    (["algorithm.aggregation=seq_mean_token_sum_norm", "algorithm.norm_length=32"],
     LossConfig(aggregation="seq_mean_token_sum_norm", norm_length=32), []),
    (["algorithm.kl_coef=1.0", "algorithm.kl_estimator=k1"],
     LossConfig(kl_coef=1.0, kl_estimator="k1"), []),
    (["algorithm.kl_coef=1.0", "algorithm.kl_estimator=k2"],
     LossConfig(kl_coef=1.0, kl_estimator="k2"), ["algorithm.kl_coef=1.0",
                                                 "algorithm.kl_estimator=k1"]),
    (["algorithm.kl_coef=1.0"], LossConfig(kl_coef=1.0, kl_estimator="k3"),
     ["algorithm.kl_coef=1.0", "algorithm.kl_estimator=k1"]),
    (["algorithm.entropy_coef=0.5"], LossConfig(entropy_coef=0.5), []),
    (["algorithm.tis_mode=truncate"], LossConfig(tis=TISParams("truncate", "token", 2.0)), []),
    (["algorithm.tis_mode=mask"], LossConfig(tis=TISParams("mask", "token", 2.0)),
     ["algorithm.tis_mode=truncate"]),
    (["algorithm.tis_mode=truncate", "algorithm.tis_cap=8"],
     LossConfig(tis=TISParams("truncate", "token", 8.0)), ["algorithm.tis_mode=truncate"]),
    (["algorithm.tis_mode=mask", "algorithm.tis_level=sequence"],
     LossConfig(tis=TISParams("mask", "sequence", 2.0)), ["algorithm.tis_mode=mask"]),
    (["algorithm.tis_mode=truncate", "algorithm.tis_level=geometric"],
     LossConfig(tis=TISParams("truncate", "geometric", 2.0)), ["algorithm.tis_mode=truncate"]),
    (["async_config.max_steps_off_policy=1"],  # tis_mode=auto truncates off-policy data
     LossConfig(tis=TISParams("truncate", "token", 2.0)), []),
    # kernel parameters: tight clips and weights against the kernel's defaults
    (["algorithm.loss={name: ppo, clip_low: 0.0001, clip_high: 0.0001}"], None, []),
    (["algorithm.loss={name: cispo, clip_low: 0.0, clip_high: 0.0}"], None,
     ["algorithm.loss=cispo"]),
    (["algorithm.loss={name: is, max_weight: 0.5}"], None, ["algorithm.loss=is"]),
    (["algorithm.loss={name: gspo, clip_low: 0.5, clip_high: 0.5}"], None,
     ["algorithm.loss=gspo"]),
    (["algorithm.advantage.normalize_by_std=false"], None, []),
    (["algorithm.advantage={name: grpo_passk, k: 3}"], None,
     ["algorithm.advantage={name: grpo_passk, k: 1}"]),
    (["algorithm.advantage={name: group_based_per_turn, gamma: 0.0}"], None,
     ["algorithm.advantage={name: group_based_per_turn, gamma: 1.0}"]),
]


@pytest.mark.parametrize("setting, expected, other", SETTINGS,
                         ids=[" ".join(s) for s, _, _ in SETTINGS])
def test_each_setting_reaches_the_loss_and_changes_it(tmp_path_factory, setting, expected,
                                                      other):
    step = run_step(tmp_path_factory, *setting)
    assert math.isfinite(step.metrics["train/loss"])
    if expected is not None:
        assert {c for _, _, c, _ in step.loss_calls} == {expected}
        inputs = step.loss_calls[0][3]
        assert (inputs.ref_logprobs is not None) == (expected.kl_coef > 0)
        assert (inputs.behaviour_logprobs is not None) == (expected.tis.mode != "none")
        assert (inputs.entropy is not None) == (expected.entropy_coef > 0)
    a, b = step.metrics["train/loss"], run_step(tmp_path_factory, *other).metrics["train/loss"]
    assert abs(a - b) > 1e-6 * max(1.0, abs(a)), (a, b)
