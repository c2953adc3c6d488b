"""Without MLflow (an accelerator image that lacks it) a run still tracks: JSON lines in the run
folder, one warning; and tracker: jsonl chosen on purpose resumes its history."""

import json
import os
import subprocess
import sys
import warnings

from mtrl_jax import tracking


def test_the_package_imports_without_mlflow():
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "import mtrl_jax, mtrl_jax.cli, mtrl_jax.training.trainer, mtrl_jax.sweep\n"
            "import mtrl_jax.serving.server, mtrl_jax.serving.client, mtrl_jax.evaluation\n"
            "from mtrl_jax.tracking import mlflow_available\n"
            "assert not mlflow_available()\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_run_without_mlflow_falls_back_to_json_lines_with_one_warning(tmp_path, monkeypatch):
    from mtrl_jax.training.trainer import MultiTurnRLTrainer
    from tests.test_sweep import TINY

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails
    monkeypatch.setattr(tracking, "_WARNED", False)
    over = [o for o in TINY if not o.startswith("steps=")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = MultiTurnRLTrainer(None, overrides=over + ["steps=1", f"output_dir={tmp_path}"],
                               verbose=False)
        t.train()
        t.close()
    mine = [w for w in caught if "mlflow is not installed" in str(w.message)]
    assert len(mine) == 1
    folder = tmp_path / "tracking"
    with open(folder / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert sorted({r["step"] for r in rows if r["name"] == "train/loss"}) == [1]
    with open(folder / "trajectories.jsonl") as f:
        trajs = [json.loads(line) for line in f]
    assert trajs and all(t["kind"] == "train" and t["messages"] for t in trajs)
    assert (folder / "status").read_text() == "FINISHED"
    assert json.loads((folder / "params.json").read_text())["rollout.group_size"] == 2

    # the same folder again: the history is read back (what resume consults)
    again = tracking.make_tracker("jsonl", output_dir=str(tmp_path), experiment_name="x")
    assert [s for s, _ in again.metric_history("train/loss")] == [1]
    assert again.run_id == (folder / "run_id").read_text()
