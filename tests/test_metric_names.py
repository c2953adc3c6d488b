"""Names the model writes (a tool it invented) end up in metric names: they must never end a
run. A run once died at step 8 of 10 on ``rollout/tool_calls/(calculator)``."""

from __future__ import annotations

from mtrl_jax.evaluation.metrics import episode_metrics, metric_safe
from mtrl_jax.rollout.trajectory import Sample, ToolCallRecord, Trajectory
from mtrl_jax.tracking.mlflow import MLflowTracker, safe_metric_name


def _traj(names):
    s = Sample()
    s.add_context([1, 2, 3], turn=0)
    s.add_sampled([4, 5], [-0.1, -0.2], turn=0)
    t = Trajectory(task_id="t", episode_id="e", samples=[s], messages=[],
                   finish_reason="answered", num_turns=1)
    t.tool_calls = [ToolCallRecord(turn=0, name=n, arguments={}, result="") for n in names]
    return t


def test_invented_tool_names_become_safe_metric_names():
    m = episode_metrics([_traj(["calculator", "(calculator)", "a b/c\\n", "x" * 200])])
    keys = [k for k in m if k.startswith("tool_calls/") and k != "tool_calls/mean"]
    assert "tool_calls/calculator" in keys and "tool_calls/_calculator_" in keys
    assert all(k == "tool_calls/" + metric_safe(k.split("/", 1)[1]) for k in keys)
    assert max(len(k) for k in keys) <= len("tool_calls/") + 64
    assert metric_safe("") == "_"


def test_the_mlflow_tracker_logs_any_metric_name(tmp_path):
    tr = MLflowTracker(f"sqlite:///{tmp_path}/m.db", "names")
    tr.log_metrics({"rollout/tool_calls/(calculator)": 0.5, "ok/name": 1.0}, step=1)
    assert tr.metric_history(safe_metric_name("rollout/tool_calls/(calculator)")) == [(1, 0.5)]
    assert tr.metric_history("ok/name") == [(1, 1.0)]
    tr.end()
