"""The external evaluator: PEFT adapter round trip, metrics, base vs fine-tuned with bootstrap
intervals, reproducibility, JSON and MLflow output."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from mtrl_jax.envs.base import Task
from mtrl_jax.evaluation.evaluator import MultiTurnRLEvaluator, bootstrap_diff
from mtrl_jax.models.checkpoint import load_peft_adapter
from mtrl_jax.rollout.runner import build_policy
from mtrl_jax.training.trainer import MultiTurnRLTrainer
from tests.async_envs import make_even_env
from tests.test_trainer import TINY


def _tasks(split, n):
    return [Task(id=f"{split}{i}", family="custom", name="even", prompt=f"Say {i}.",
                 split=split, expected={"answer": str(i)}) for i in range(n)]


def test_bootstrap_diff():
    a, b = np.zeros(50), np.ones(50)
    assert bootstrap_diff(a, b) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.3
    b = rng.random(200) < 0.6
    d, lo, hi = bootstrap_diff(a, b, n=2000)
    assert lo < d < hi and lo > 0.1 and hi < 0.5
    _, lo2, hi2 = bootstrap_diff(a[:50], b[:50], n=2000)
    assert hi2 - lo2 > hi - lo  # fewer tasks, wider interval
    with pytest.raises(ValueError, match="paired"):
        bootstrap_diff(np.zeros(3), np.zeros(4))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    t = MultiTurnRLTrainer(overrides=TINY + ["steps=2", f"output_dir={out}", "eval_interval=0"],
                           train_tasks=_tasks("train", 6), val_tasks=_tasks("val", 3),
                           make_env=make_even_env, verbose=False)
    t.train()
    lora = [np.asarray(x) for x in jax.tree.leaves(t.lora)]
    config = t.config
    val = t.evaluate("val", log_metrics=False, log_traces=False)
    t.close()
    return out, lora, config, val


def test_peft_adapter_round_trip(trained_run):
    out, lora, config, _ = trained_run
    _, model = build_policy(config)
    load_peft_adapter(model, out / "adapter")
    from mtrl_jax.models.lora import split_lora

    _, fresh, _ = split_lora(model)
    for x, y in zip(lora, jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    other = config.__class__(**{**config.__dict__, "lora": config.lora.__class__(lora_rank=2)})
    _, small = build_policy(other)
    with pytest.raises(ValueError, match="does not fit"):
        load_peft_adapter(small, out / "adapter")


def test_base_vs_finetuned_side_by_side(trained_run, tmp_path):
    out, _, _, _ = trained_run

    def run():
        ev = MultiTurnRLEvaluator(adapter=out / "adapter", overrides=TINY,
                                  tasks=_tasks("test", 6), make_env=make_even_env,
                                  samples_per_task=4, evaluate_base_model=True,
                                  output_dir=tmp_path / "eval", verbose=False)
        return ev, ev.evaluate()

    ev, res = run()
    base, ft = res["models"]["base"], res["models"]["finetuned"]
    for m in (base, ft):
        for k in ("greedy/strict_success", "sampled/strict_success", "strict_pass_k_1",
                  "strict_pass_k_4", "reward_pass_k_4", "greedy/reward/mean",
                  "sampled/reward/mean", "greedy/completion_rate", "sampled/completion_rate",
                  "greedy/max_turns_frac", "greedy/truncated_frac", "greedy/tool_error_rate",
                  "greedy/format_compliance", "greedy/turns/mean", "greedy/tokens/response_mean",
                  "reward_strict_disagreements"):
            assert k in m and np.isfinite(m[k]), k
        assert m["strict_pass_k_1"] <= m["strict_pass_k_4"]
        assert m["strict_pass_k_1"] == pytest.approx(m["sampled/strict_success"])
    # the adapter changed the policy
    assert base["greedy/reward/mean"] != ft["greedy/reward/mean"]
    d = res["diff"]["greedy/reward/mean"]
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    per = res["per_task"]
    assert d["diff"] == pytest.approx(np.mean(per["finetuned"]["greedy/reward/mean"])
                                      - np.mean(per["base"]["greedy/reward/mean"]))
    with open(ev.results_path) as f:
        assert json.load(f)["models"]["base"] == base
    _, again = run()  # same seed, same numbers
    assert again["models"] == res["models"] and again["diff"] == res["diff"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{os.path.join(tmp_path / 'eval', 'mlflow.db')}")
    runs = client.search_runs([client.get_experiment_by_name("mtrl_eval").experiment_id])
    assert runs and "eval/finetuned/greedy/strict_success" in runs[0].data.metrics
    assert "eval/diff/greedy/reward/mean_ci_low" in runs[0].data.metrics


def test_cli_eval_of_a_training_run(trained_run, tmp_path, capsys):
    from mtrl_jax.cli import main

    out, _, _, _ = trained_run
    rc = main(["eval", "--run", str(out), "--n", "3", "--samples", "2",
               "--output-dir", str(tmp_path / "cli"), "data.task=math:arith",
               "data.system_prompt=none", "rollout.max_context_tokens=128"])
    assert rc == 0
    with open(tmp_path / "cli" / "eval_results.json") as f:
        res = json.load(f)
    assert list(res["models"]) == ["finetuned"] and res["n_tasks"] == 3
    assert res["adapter"].endswith("adapter") and "strict_pass_k_2" in res["models"]["finetuned"]
    assert "greedy/strict_success" in capsys.readouterr().out


def test_trainer_validation_and_evaluator_report_the_same_figures(trained_run, tmp_path):
    """One definition of each metric: the trainer's val/* of its final weights equal, to the
    last bit, what MultiTurnRLEvaluator reports for the exported adapter on the same tasks and
    seed."""
    out, _, config, val = trained_run
    ev = MultiTurnRLEvaluator(adapter=out / "adapter", overrides=TINY, tasks=_tasks("val", 3),
                              make_env=make_even_env, seed=config.seed,
                              output_dir=tmp_path / "eval", verbose=False)
    ft = ev.evaluate()["models"]["finetuned"]
    from_trainer = {k.removeprefix("val/"): v for k, v in val.items()}
    assert len(ft) > 30 and ft.keys() == from_trainer.keys()
    assert ft == from_trainer
    assert ft["greedy/strict_success"] == 0.0 and "strict_pass_k_2" in ft  # scored, not skipped
