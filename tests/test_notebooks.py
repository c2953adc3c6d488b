"""The notebooks in notebooks/ run top to bottom (cell by cell, through jupytext) and compute
what they claim. The two that read a sweep and a run's traces back from MLflow run in
tests/test_sweep.py and below, on data the tests produce."""

import numpy as np

from tests.notebook_runner import NOTEBOOKS, run_notebook


def test_there_are_three_notebooks_in_percent_format():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.py"))
    assert names == ["kernels_tour.py", "sweep_analysis.py", "trajectories.py"]
    for p in NOTEBOOKS.glob("*.py"):
        assert p.read_text().startswith("# %% [markdown]")


def test_the_kernels_tour_checks_every_kernel_against_its_definition():
    ns = run_notebook("kernels_tour.py")
    # its numbers, seen from outside: GRPO's success/failure credit for 2 of 8 successes
    adv = ns["table"]["group_based"]
    r = np.array([1.0, 0, 0, 1, 0, 0, 0, 0])
    assert np.allclose(adv, (r - r.mean()) / r.std(ddof=1), atol=1e-4)
    assert [k for k, _ in ns["passk_rows"]] == [1, 2, 3, 4, 6]
    assert max(err for _, err in ns["passk_rows"]) < 1e-4
    assert ns["ppo_dropped"] == 8 and ns["cispo_dropped"] == 0
    assert set(ns["grads"]) == {(n, a) for n in ("ppo", "cispo", "is", "gspo")
                                for a in (1.0, -1.0)}


def test_the_trajectories_notebook_reads_back_every_episode_from_mlflow(tmp_path):
    """Real episodes (the demo's noisy teacher through the real agent loop and environment, with
    tool calls and partial-credit rewards) logged by the real tracker, then read back."""
    from mtrl_jax.demo import WarmupConfig, demo_corpus, teacher_trajectories
    from mtrl_jax.models.tokenizer import build_word_tokenizer
    from mtrl_jax.tracking.mlflow import MLflowTracker, default_tracking_uri

    cfg = WarmupConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                       num_kv_heads=2, head_dim=16, episodes=24, steps=1, batch_episodes=8)
    trajs = teacher_trajectories(build_word_tokenizer(demo_corpus(0)), cfg)
    tracker = MLflowTracker(default_tracking_uri(str(tmp_path)), "nb", run_name="teacher")
    for i, t in enumerate(trajs):
        t.strict_score = float(t.reward_metrics["strict"])
        tracker.log_trajectory(t, step=1 + i // 8, kind="train" if i < 16 else "val")
    tracker.end()

    ns = run_notebook("trajectories.py", {"MTRL_NB_RUN": str(tmp_path)})
    ep = ns["episodes"].set_index("episode_id")
    assert len(ep) == len(trajs) == 24
    for t in trajs:
        row = ep.loc[t.episode_id]
        assert row.turns == t.num_turns and row.tool_calls == len(t.tool_calls)
        assert row.reward == t.reward and row.strict == t.strict_score
    assert ns["tool_calls"].shape[0] == sum(len(t.tool_calls) for t in trajs) > 24
    assert dict(ns["by_kind"].episodes) == {"train": 16, "val": 8}
    # the teacher's borderline mistakes: partial credit (>= 0.5) on a failed task
    expect = {t.episode_id for t in trajs if (t.reward >= 0.5) != (t.strict_score >= 1.0)}
    assert expect and set(ns["disagree"].episode_id) == expect
    assert ns["confusion"].values.sum() == 24
