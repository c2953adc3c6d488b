"""What a newcomer meets first: the command line's options, quiet start-up, progress lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtrl_jax.cli import build_parser, main
from mtrl_jax.evaluation import metrics as metrics_mod
from mtrl_jax.evaluation.metrics import play_task_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY = os.path.join(REPO, "examples", "my_family.py")


def test_every_command_takes_import():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "demo", "env-check", "eval", "reward-audit", "report", "doctor"} <= \
        set(commands)
    for name, sub in commands.items():
        assert any("--import" in a.option_strings for a in sub._actions), name


def test_env_check_of_a_user_family_by_import(capsys):
    assert main(["env-check", "warehouse:stock", "--import", FAMILY, "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 of" in out and out.rstrip().endswith("OK")


def test_a_bad_import_fails_with_the_spec_named(capsys):
    assert main(["env-check", "math:arith", "--import", "no_such_module_xyz"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_train_passes_imports_to_the_recipe_for_rollout_workers(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--recipe", os.path.join(REPO, "configs", "demo_cpu.yaml"),
               "--import", FAMILY, "data.task=warehouse:stock", "data.system_prompt=task",
               "steps=0", "eval_interval=0", f"output_dir={out}", "tracker=none",
               "model.path=null", "model.tokenizer=byte",
               "model.tiny={hidden_size: 32, intermediate_size: 64, num_layers: 1, "
               "num_heads: 2, num_kv_heads: 1, head_dim: 16, tie_word_embeddings: true}"])
    assert rc == 0
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["data"]["imports"] == [FAMILY] and config["data"]["task"] == "warehouse:stock"


DEMO_RECIPE = os.path.join(REPO, "configs", "demo_cpu.yaml")
BAD = ["rollout.top_p=1.5", "checkpoint_interval=-1", "rollout.group_sise=2"]
BAD_LINES = [
    "mtrl: config error: unknown key 'rollout.group_sise' -- did you mean 'rollout.group_size'?",
    "mtrl: config error: rollout.top_p: must be in (0, 1], got 1.5",
    "mtrl: config error: checkpoint_interval: must be >= 0 (0 = never), got -1",
]


@pytest.mark.parametrize("command", [
    ["train", "--recipe", DEMO_RECIPE],
    ["eval", "--recipe", DEMO_RECIPE],
    ["reward-audit", "--recipe", DEMO_RECIPE],
    ["demo"],  # checked before the warm-up
])
def test_a_bad_recipe_value_is_one_line_per_error_and_exit_2(command, capsys, tmp_path):
    rc = main([*command, *BAD] + (["--output-dir", str(tmp_path)] if command == ["demo"] else []))
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines() == BAD_LINES


def test_a_recipe_that_is_not_yaml_is_one_line(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("rollout:\n  top_p: [0.5\nsteps: 3\n")
    assert main(["train", "--recipe", str(recipe)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"mtrl: config error: recipe {str(recipe)!r}: not valid YAML: ")


def test_eval_of_a_run_folder_without_its_recipe_is_one_line(capsys, tmp_path):
    assert main(["eval", "--run", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mtrl eval: ") and "config.json" in line


def test_the_mtrl_command_prints_config_errors_without_a_traceback(tmp_path):
    mtrl = os.path.join(os.path.dirname(sys.executable), "mtrl")
    cmd = [mtrl] if os.path.exists(mtrl) else [sys.executable, "-m", "mtrl_jax.cli"]
    p = subprocess.run([*cmd, "train", "--recipe", DEMO_RECIPE, *BAD,
                        "val_sampling_params.success_threshold=nan"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == BAD_LINES[:2] + [
        "mtrl: config error: val_sampling_params.success_threshold: must be a finite number, "
        "got nan"] + BAD_LINES[2:]


def test_no_pytorch_notice_at_start_up():
    """transformers announces a missing torch at import; this package uses it for tokenizers
    and configs only, so a torch-less install must start quietly (the notice is hidden here by
    making torch look absent)."""
    hide_torch = ("import importlib.util as u; f = u.find_spec; "
                  "u.find_spec = lambda n, *a, **k: None if n == 'torch' else f(n, *a, **k); ")
    plain = subprocess.run([sys.executable, "-c", hide_torch + "import transformers"],
                           capture_output=True, text=True, cwd=REPO)
    assert "PyTorch was not found" in plain.stderr  # the notice this test is about exists
    ours = subprocess.run([sys.executable, "-c", hide_torch + "import mtrl_jax.models.tokenizer"],
                          capture_output=True, text=True, cwd=REPO)
    assert ours.returncode == 0 and "PyTorch was not found" not in ours.stderr


class _Runner:
    """Two lockstep rounds per call, reported like RolloutRunner.run_episodes."""

    def sampling(self, temperature, max_tokens):
        return (temperature, max_tokens)

    def run_episodes(self, tasks, n, key, *, sampling, tag, progress=None):
        total = len(tasks) * n
        for done in (total // 2, total):
            if progress is not None:
                progress(done, total)
        return []


def test_a_long_play_prints_progress_lines(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(metrics_mod, "PROGRESS_EVERY_S", 0.0)
    play_task_set(_Runner(), ["a", "b"], seed=0, num_samples=4, temperature=1.0,
                  max_tokens=8, tag="test", progress=lines.append)
    assert [x.split(" (")[0] for x in lines] == [
        "test: 1/2 greedy episodes", "test: 2/2 greedy episodes", "test: 4/8 sampled episodes",
        "test: 8/8 sampled episodes"]
    lines.clear()
    monkeypatch.setattr(metrics_mod, "PROGRESS_EVERY_S", 3600.0)  # throttled: ends only
    play_task_set(_Runner(), ["a", "b"], seed=0, num_samples=4, temperature=1.0,
                  max_tokens=8, tag="test", progress=lines.append)
    assert [x.split(" (")[0] for x in lines] == ["test: 2/2 greedy episodes",
                                                 "test: 8/8 sampled episodes"]


def test_the_package_refers_to_no_path_outside_the_repository():
    """A user's clone has no team workspace beside it: no code or docstring may point there."""
    pkg = os.path.join(REPO, "mtrl_jax")
    offenders = []
    for root, _, files in os.walk(pkg):
        for name in files:
            if name.endswith((".py", ".json", ".cc")):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
                if "../shared" in text or "shared/sop-bench" in text or "DESIGN.md" in text:
                    offenders.append(os.path.relpath(os.path.join(root, name), REPO))
    assert offenders == []


TINY_RUN = ["data.task=math:arith", "model.path=null", "model.tokenizer=byte",
            "model.tiny={hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, "
            "num_kv_heads: 1, head_dim: 16, tie_word_embeddings: true}",
            "rollout.batch_size=2", "rollout.group_size=2", "rollout.max_turns=1",
            "rollout.sampling_max_tokens=8", "rollout.max_context_tokens=256",
            "packing.row_lengths=[256]", "eval_interval=0", "checkpoint_interval=0",
            "async_config.max_steps_off_policy=0"]


def test_sigterm_saves_a_checkpoint_and_a_second_run_on_the_folder_is_refused(tmp_path):
    """``mtrl train`` as a user runs it: a second run on a folder in use stops at once naming
    the holder; SIGTERM ends the first with exit 143, a checkpoint and the run KILLED."""
    import signal
    import time

    mtrl = os.path.join(os.path.dirname(sys.executable), "mtrl")
    cmd = [mtrl] if os.path.exists(mtrl) else [sys.executable, "-m", "mtrl_jax.cli"]
    out = tmp_path / "run"
    args = [*cmd, "train", "--recipe", DEMO_RECIPE, *TINY_RUN, f"output_dir={out}"]
    first = subprocess.Popen([*args, "steps=100000"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        line = ""
        while "step    2/" not in line and time.time() < deadline:
            line = first.stdout.readline()
            assert line or first.poll() is None, first.stderr.read()
        assert "step    2/" in line
        second = subprocess.run([*args, "steps=3"], capture_output=True, text=True,
                                cwd=tmp_path, timeout=240)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by another run: pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 143, err
    assert "SIGTERM at step" in err and "run the same command to resume" in err
    saved = sorted(int(x) for x in os.listdir(out / "checkpoints") if x.isdigit())
    assert saved and saved[-1] >= 2
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("mtrl_demo").experiment_id])
    assert run.info.status == "KILLED"
    # (resuming after SIGTERM, exactly: tests/test_trainer.py, in-process to save CI time)
