"""``mtrl doctor``: each failure pattern on a synthetic history that shows it, and a healthy
history that must trigger nothing."""

from __future__ import annotations

import numpy as np
import pytest

from mtrl_jax.evaluation.doctor import RULES, diagnose, load_history

N = 40


def _hist(reward, **extra):
    rng = np.random.default_rng(0)
    r = np.asarray(reward, float)
    h = {
        "rollout/reward/mean": list(enumerate(r)),
        "rollout/reward/zero_frac": [(s, 0.1) for s in range(len(r))],
        "rollout/format_errors/mean": [(s, 0.0) for s in range(len(r))],
        "analysis/zero_adv_groups": [(s, 0.2 + 0.05 * rng.random()) for s in range(len(r))],
        "rollout/truncated_frac": [(s, 0.01) for s in range(len(r))],
        "rollout/completion_rate": [(s, 0.95) for s in range(len(r))],
        "train/grad_norm": [(s, 0.5) for s in range(len(r))],
        "val/greedy/completion_rate": [(s, 0.95) for s in range(0, len(r) + 1, 10)],
        "val/greedy/strict_success": [(s, 0.1 + 0.1 * i) for i, s in
                                  enumerate(range(0, len(r) + 1, 10))],
        "val/reward_strict_disagreements": [(s, 2.0) for s in range(0, len(r) + 1, 10)],
    }
    for k, v in extra.items():
        h[k.replace("__", "/")] = v
    return h


def _noisy(v, scale=0.02, seed=1):
    return np.asarray(v) + scale * np.random.default_rng(seed).standard_normal(len(v))


def healthy():
    return _hist(_noisy(np.linspace(0.3, 0.7, N)))


PATTERNS = {
    "reward_flat_from_start": lambda: _hist(
        np.zeros(20), rollout__reward__zero_frac=[(s, 1.0) for s in range(20)],
        rollout__format_errors__mean=[(s, 1.0) for s in range(20)]),
    "uniform_groups": lambda: _hist(
        _noisy(np.linspace(0.3, 0.7, N)),
        analysis__zero_adv_groups=[(s, 0.8) for s in range(N)]),
    "reward_hacking": lambda: _hist(
        _noisy(np.linspace(0.3, 0.8, N)),
        val__greedy__strict_success=[(s, 0.12) for s in range(0, N + 1, 10)],
        val__reward_strict_disagreements=[(s, 2.0 + s) for s in range(0, N + 1, 10)]),
    "reward_collapse": lambda: _hist(_noisy(np.concatenate(
        [np.linspace(0.3, 0.7, 20), np.linspace(0.7, 0.25, 20)]))),
    "truncated_turns": lambda: _hist(
        _noisy(np.linspace(0.3, 0.7, N)),
        rollout__truncated_frac=[(s, 0.12) for s in range(N)]),
    "low_completion": lambda: _hist(
        _noisy(np.linspace(0.3, 0.7, N)),
        val__greedy__completion_rate=[(s, 0.5) for s in range(0, N + 1, 10)]),
    "low_correctness": lambda: _hist(
        _noisy(np.full(N, 0.2)),
        val__greedy__strict_success=[(s, 0.05) for s in range(0, N + 1, 10)]),
    "slow_stall": lambda: _hist(
        _noisy(np.concatenate([np.linspace(0.2, 0.5, 20), np.full(20, 0.5)]), 0.01),
        val__greedy__strict_success=[(s, v) for s, v in zip(range(0, N + 1, 10),
                                                       [0.1, 0.3, 0.4, 0.4, 0.45],
                                                       strict=True)]),
}


def test_every_rule_has_a_pattern_test():
    assert {r.__name__ for r in RULES} == set(PATTERNS)


def test_a_healthy_run_triggers_nothing():
    assert diagnose(healthy()) == []


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_each_pattern_is_named_with_advice(name):
    findings = {f.name: f for f in diagnose(PATTERNS[name]())}
    assert name in findings, findings
    f = findings[name]
    assert f.seen and f.first_change and f.confirm
    # the rule fires on its own pattern, not on the healthy run
    rule = next(r for r in RULES if r.__name__ == name)
    assert rule(healthy()) is None


def test_specific_advice():
    by = lambda n: {f.name: f for f in diagnose(PATTERNS[n]())}[n]
    assert "max_steps_off_policy=0" in by("reward_collapse").first_change
    assert "PPO" in by("reward_collapse").first_change
    assert "lora_rank" in by("slow_stall").first_change
    assert "group_size" in by("uniform_groups").first_change
    assert "zero_adv_groups" in by("uniform_groups").confirm
    assert "sampling_max_tokens" in by("truncated_turns").first_change
    assert "disagree" in by("reward_hacking").first_change


def test_reads_a_run_folder_from_mlflow_and_the_cli(tmp_path, capsys):
    import mlflow

    from mtrl_jax.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.create_experiment("x")
    run = client.create_run(exp)
    for k, pts in PATTERNS["reward_collapse"]().items():
        for s, v in pts:
            client.log_metric(run.info.run_id, k, float(v), step=int(s))
    client.set_terminated(run.info.run_id)
    hist, run_id = load_history(str(run_dir))
    assert run_id == run.info.run_id and len(hist["rollout/reward/mean"]) == N
    assert [f.name for f in diagnose(hist)] == ["reward_collapse"]
    assert main(["doctor", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "reward_collapse" in out and "max_steps_off_policy=0" in out
    with pytest.raises(FileNotFoundError, match=r"mlflow\.db"):
        load_history(str(tmp_path))
