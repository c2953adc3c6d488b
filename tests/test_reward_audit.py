"""``mtrl reward-audit``: verdicts on synthetic baseline episodes, and an end-to-end audit of a
lenient reward."""

from __future__ import annotations

import pytest

from mtrl_jax.envs.base import Task
from mtrl_jax.evaluation.reward_audit import audit_trajectories, format_report, reward_audit
from mtrl_jax.rollout.trajectory import Trajectory
from tests.async_envs import make_lenient_env
from tests.test_trainer import TINY


def _traj(i, reward, strict, text="x"):
    return Trajectory(task_id=f"t{i // 2}", episode_id=f"e{i}", samples=[], messages=[],
                      finish_reason="answered", num_turns=1, final_text=text, reward=reward,
                      strict_score=strict)


def _audit(pairs, g=2):
    return audit_trajectories([_traj(i, r, s) for i, (r, s) in enumerate(pairs)], g)


def test_safe_reward():
    r = _audit([(1.0, 1.0), (0.3, 0.0), (1.0, 1.0), (0.0, 0.0), (0.5, 0.0), (1.0, 1.0)])
    assert r.verdict == "safe" and r.lenient == 0 and r.agreement == 1.0
    assert r.strict_successes == 3 and r.tasks_with_success == 1.0
    assert r.reward_success_mean == 1.0 and r.reward_failure_mean == pytest.approx(0.8 / 3)
    assert "SAFE" in format_report(r)


def test_a_lenient_reward_is_never_called_safe():
    r = _audit([(1.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.0, 0.0)])
    assert r.verdict == "lenient" and r.lenient == 1 and r.agreement == 0.75
    assert r.lenient_examples[0]["episode_id"] == "e1"
    assert "more lenient" in r.reasons[0]


def test_no_foothold_and_no_signal():
    r = _audit([(0.0, 0.0)] * 4)
    assert r.verdict == "no_foothold" and r.equal_groups == 1.0
    r = _audit([(1.0, 1.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])
    assert r.verdict == "no_signal" and r.equal_groups == pytest.approx(2 / 3)
    r = _audit([(0.9, 1.0), (0.0, 0.0)])  # strict success the reward does not credit
    assert r.strict_only == 1 and r.verdict == "safe"


def test_needs_expected_fields_and_whole_groups():
    with pytest.raises(ValueError, match="expected"):
        audit_trajectories([_traj(0, 1.0, None), _traj(1, 1.0, None)], 2)
    with pytest.raises(ValueError, match="groups"):
        _audit([(1.0, 1.0)] * 3)


def test_end_to_end_flags_a_lenient_reward(capsys):
    tasks = [Task(id=f"t{i}", family="custom", name="x", prompt=f"Say {i}.",
                  expected={"answer": str(i)}) for i in range(3)]
    r = reward_audit(overrides=TINY + ["rollout.max_turns=1"], n_tasks=3, tasks=tasks,
                     make_env=make_lenient_env)
    assert r.episodes == 3 * 4 and r.groups == 3
    assert r.strict_successes == 0 and r.lenient == 12 and r.agreement == 0.0
    assert r.verdict == "lenient" and len(r.lenient_examples) == 5
