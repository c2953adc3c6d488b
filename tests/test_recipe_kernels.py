"""Every recipe setting reaches its kernel: one trainer step for every estimator x loss pair,
with spies on the kernel calls, and the settings that must change the loss do change it.

The steps train on replayed multi-turn episodes (literal byte tokens, per-turn rewards that
differ within each group, behaviour log-probs far from the policy's on some tokens) so that every
estimator has signal and every TIS mode has weights to cut.
"""

from __future__ import annotations

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
               "rollout.max_turns=2"]


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


def _trainer(tmp_path, name, overrides):
    return MultiTurnRLTrainer(overrides=BASE + [f"output_dir={tmp_path / name}", "steps=1",
                                                *overrides],
                              train_tasks=_tasks(), make_env=lambda t: None,
                              rollout_source=ReplaySource(), verbose=False)


def _yaml(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


@pytest.fixture
def spies(monkeypatch):
    calls: dict[str, list] = {"advantage": [], "loss": []}
    real_adv, real_loss = batch_mod.compute_advantages, update_mod.policy_loss

    def adv_spy(method, rewards, valid=None, *, params=None, lengths=None):
        calls["advantage"].append((method, params, tuple(rewards.shape), lengths is not None))
        return real_adv(method, rewards, valid, params=params, lengths=lengths)

    def loss_spy(name, inputs, params=None, config=None, **kw):
        calls["loss"].append((name, params, config, inputs))
        return real_loss(name, inputs, params, config, **kw)

    monkeypatch.setattr(batch_mod, "compute_advantages", adv_spy)
    monkeypatch.setattr(update_mod, "policy_loss", loss_spy)
    return calls


@pytest.mark.parametrize("adv, loss", list(itertools.product(ADVANTAGES, LOSSES)))
def test_each_estimator_and_loss_receive_exactly_the_recipes_parameters(tmp_path, spies, adv,
                                                                        loss):
    (adv_recipe, adv_params), (loss_recipe, loss_params) = ADVANTAGES[adv], LOSSES[loss]
    t = _trainer(tmp_path, "m", [f"algorithm.advantage={_yaml({'name': adv, **adv_recipe})}",
                                 f"algorithm.loss={_yaml({'name': loss, **loss_recipe})}"])
    m = t.train_step()
    t.close()
    assert math.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0
    [(name, params, shape, with_lengths)] = spies["advantage"]
    assert (name, params) == (adv, adv_params)
    assert shape == ((2, 4, 2) if adv == "group_based_per_turn" else (2, 4))
    assert with_lengths == (adv == "opo")
    names = {(n, p) for n, p, _, _ in spies["loss"]}
    assert names == {(loss, loss_params)}  # traced once per shape, always with these
    assert {c for _, _, c, _ in spies["loss"]} == {LossConfig(tis=TISParams(mode="none"))}
    assert m["analysis/zero_adv_groups"] < 1.0  # the estimator saw signal


@pytest.mark.parametrize("overrides, expected", [
    (["algorithm.aggregation=seq_mean_token_mean"],
     LossConfig(aggregation="seq_mean_token_mean")),
    (["algorithm.aggregation=seq_mean_token_sum"], LossConfig(aggregation="seq_mean_token_sum")),
    (["algorithm.aggregation=seq_mean_token_sum_norm", "algorithm.norm_length=32"],
     LossConfig(aggregation="seq_mean_token_sum_norm", norm_length=32)),
    (["algorithm.kl_coef=0.3", "algorithm.kl_estimator=k1"],
     LossConfig(kl_coef=0.3, kl_estimator="k1")),
    (["algorithm.kl_coef=0.3", "algorithm.kl_estimator=k2"],
     LossConfig(kl_coef=0.3, kl_estimator="k2")),
    (["algorithm.kl_coef=0.3"], LossConfig(kl_coef=0.3, kl_estimator="k3")),
    (["algorithm.entropy_coef=0.01"], LossConfig(entropy_coef=0.01)),
    (["algorithm.tis_mode=truncate", "algorithm.tis_cap=1.5"],
     LossConfig(tis=TISParams("truncate", "token", 1.5))),
    (["algorithm.tis_mode=mask", "algorithm.tis_level=sequence"],
     LossConfig(tis=TISParams("mask", "sequence", 2.0))),
    (["algorithm.tis_mode=truncate", "algorithm.tis_level=geometric"],
     LossConfig(tis=TISParams("truncate", "geometric", 2.0))),
    (["async_config.mode=inprocess", "async_config.max_steps_off_policy=1"],
     LossConfig(tis=TISParams("truncate", "token", 2.0))),  # auto TIS when off-policy
])
def test_shared_loss_settings_reach_the_loss(tmp_path, spies, overrides, expected):
    t = _trainer(tmp_path, "s", overrides)
    m = t.train_step()
    t.close()
    assert math.isfinite(m["train/loss"])
    assert {c for _, _, c, _ in spies["loss"]} == {expected}
    inputs = spies["loss"][0][3]
    assert (inputs.ref_logprobs is not None) == (expected.kl_coef > 0)
    assert (inputs.behaviour_logprobs is not None) == (expected.tis.mode != "none")
    assert (inputs.entropy is not None) == (expected.entropy_coef > 0)


def _loss(tmp_path, name, overrides) -> float:
    t = _trainer(tmp_path, name, ["optimizer.epochs=2", "optimizer.learning_rate=0.2",
                                  *overrides])
    m = t.train_step()
    t.close()
    return m["train/loss"]


@pytest.mark.parametrize("base, variant", [
    (["algorithm.advantage.normalize_by_std=true"],
     ["algorithm.advantage.normalize_by_std=false"]),
    (["algorithm.advantage={name: grpo_passk, k: 1}"],
     ["algorithm.advantage={name: grpo_passk, k: 3}"]),
    (["algorithm.advantage={name: group_based_per_turn, gamma: 1.0}"],
     ["algorithm.advantage={name: group_based_per_turn, gamma: 0.0}"]),
    (["algorithm.loss={name: ppo}"], ["algorithm.loss={name: ppo, clip_low: 0.0001, "
                                      "clip_high: 0.0001}"]),
    (["algorithm.loss={name: cispo}"], ["algorithm.loss={name: cispo, clip_low: 0.0, "
                                        "clip_high: 0.0}"]),
    (["algorithm.loss={name: is}"], ["algorithm.loss={name: is, max_weight: 0.5}"]),
    (["algorithm.loss={name: gspo}"], ["algorithm.loss={name: gspo, clip_low: 0.5, "
                                       "clip_high: 0.5}"]),
    (["algorithm.aggregation=token_mean"], ["algorithm.aggregation=seq_mean_token_sum"]),
    (["algorithm.kl_coef=0"], ["algorithm.kl_coef=1.0"]),
    (["algorithm.entropy_coef=0"], ["algorithm.entropy_coef=0.5"]),
    (["algorithm.tis_mode=none"], ["algorithm.tis_mode=truncate"]),
    (["algorithm.tis_mode=truncate"], ["algorithm.tis_mode=mask"]),
    (["algorithm.tis_mode=truncate"], ["algorithm.tis_mode=truncate", "algorithm.tis_cap=8"]),
])
def test_settings_that_must_change_the_loss_change_it(tmp_path, base, variant):
    a, b = _loss(tmp_path, "a", base), _loss(tmp_path, "b", variant)
    assert math.isfinite(a) and math.isfinite(b)
    assert abs(a - b) > 1e-6 * max(1.0, abs(a)), (a, b)

