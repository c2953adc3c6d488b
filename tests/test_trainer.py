"""The trainer end to end on a tiny random byte-level model and a custom environment.

The environment rewards the share of even byte values in the last assistant turn, so a random
policy gets varied rewards, non-zero advantages and real LoRA updates.
"""

import math
import os
import socket
import subprocess
import sys
import time
from typing import ClassVar

import jax
import numpy as np
import pytest

from mtrl_jax.envs.base import Environment, Task
from mtrl_jax.training.checkpointing import CheckpointError
from mtrl_jax.training.trainer import MultiTurnRLTrainer

TINY = [
    "model.tiny={hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, "
    "num_kv_heads: 1, head_dim: 16, tie_word_embeddings: true}",
    "lora.lora_rank=4", "rollout.batch_size=2", "rollout.group_size=4", "rollout.max_turns=1",
    "rollout.sampling_max_tokens=8", "rollout.max_context_tokens=128",
    "val_sampling_params.sampling_max_tokens=8", "val_sampling_params.num_samples=2",
    "packing.row_lengths=[128]", "packing.row_multiple=2", "optimizer.learning_rate=5e-2",
    "eval_interval=2", "checkpoint_interval=2", "trace_samples_per_step=1",
]


class EvenBytes(Environment):
    nan_on_call: ClassVar[set[int]] = set()
    calls = 0

    def reward(self, episode):
        text = next((m["content"] for m in reversed(episode.messages)
                     if m["role"] == "assistant"), "")
        data = text.encode()
        r = sum(b % 2 == 0 for b in data) / max(1, len(data))
        EvenBytes.calls += 1
        if EvenBytes.calls in EvenBytes.nan_on_call:
            r = float("nan")
        episode.update_reward(r, {"even": r})


def tasks(split, n):
    return [Task(id=f"{split}{i}", family="custom", name="even", prompt=f"Say {i}.",
                 split=split) for i in range(n)]


def make(tmp_path, name, steps, overrides_extra=(), **kw):
    return MultiTurnRLTrainer(
        overrides=TINY + [f"steps={steps}", f"output_dir={tmp_path / name}", *overrides_extra],
        train_tasks=tasks("train", 6), val_tasks=tasks("val", 2), make_env=lambda t: EvenBytes(),
        verbose=False, **kw)


def _comparable(m):
    return {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))}


def _lora_leaves(t):
    return [np.asarray(x) for x in jax.tree.leaves(t.lora)]


def test_resume_is_exact(tmp_path):
    EvenBytes.nan_on_call = set()
    straight = make(tmp_path, "straight", 4)
    hist = straight.train()
    straight.close()
    assert len(hist) == 4
    assert any(abs(m["train/grad_norm"]) > 0 for m in hist)  # real updates happened

    first = make(tmp_path, "resumed", 2)
    first.train()
    first.close()
    second = make(tmp_path, "resumed", 4)  # resume="auto" picks up step 2
    assert second.step == 2 and second.data_pos == 2 * 2
    rest = second.train()
    second.close()
    assert len(rest) == 2
    for a, b in zip(hist[2:], rest, strict=True):
        ca, cb = _comparable(a), _comparable(b)
        assert ca.keys() == cb.keys()
        for k in ca:
            assert (math.isnan(ca[k]) and math.isnan(cb[k])) or ca[k] == cb[k], k
    for x, y in zip(_lora_leaves(straight), _lora_leaves(second), strict=True):
        np.testing.assert_array_equal(x, y)
    # each trainer logs to its own run folder's store (mlflow.set_tracking_uri exports
    # MLFLOW_TRACKING_URI; the tracker must not let the first store capture later trainers)
    assert "straight" in straight.tracker.uri and "resumed" in second.tracker.uri
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
    # the resumed run continued the same MLflow run: 4 steps of metrics there
    client = second.tracker.client
    steps = sorted(m.step for m in client.get_metric_history(second.tracker.run_id,
                                                             "rollout/reward/mean"))
    assert steps == [1, 2, 3, 4]
    assert client.get_run(second.tracker.run_id).info.status == "FINISHED"
    # the adapter was exported
    assert os.path.exists(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")


def test_nan_loss_skips_the_update_and_training_goes_on(tmp_path):
    EvenBytes.calls = 0
    EvenBytes.nan_on_call = {9}  # an episode of step 2 (8 episodes per step)
    t = make(tmp_path, "nan", 3)
    t.train_step()
    before = _lora_leaves(t)
    m2 = t.train_step()
    assert m2["train/skipped_updates"] == 1.0
    assert not math.isfinite(m2["train/loss"])
    for x, y in zip(before, _lora_leaves(t), strict=True):
        np.testing.assert_array_equal(x, y)
    m3 = t.train_step()
    assert m3["train/skipped_updates"] == 0.0 and math.isfinite(m3["train/loss"])
    assert any((x != y).any() for x, y in zip(before, _lora_leaves(t), strict=True))
    EvenBytes.nan_on_call = set()
    t.close()


def test_ctrl_c_saves_and_marks_run_killed(tmp_path, monkeypatch):
    EvenBytes.nan_on_call = set()
    # several updates per step: old log-probs from a separate forward, ratios move off 1
    t = make(tmp_path, "killed", 5, overrides_extra=["optimizer.mini_batches=2",
                                                     "optimizer.epochs=2"])
    real = t.train_step
    calls = {"n": 0}

    def interrupted():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(t, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    t.close()
    assert t.history[0]["train/ratio_max"] > 1.0 or t.history[0]["train/ratio_min"] < 1.0
    assert t.checkpoints.latest_step() == 1
    assert t.tracker.client.get_run(t.tracker.run_id).info.status == "KILLED"


def test_corrupt_and_incompatible_checkpoints(tmp_path):
    t = make(tmp_path, "ck", 1)
    t.train()
    t.close()
    ck = tmp_path / "ck" / "checkpoints" / "1"
    assert ck.is_dir()
    with pytest.raises(CheckpointError, match=r"incompatible.*lora.lora_rank"):
        MultiTurnRLTrainer(overrides=TINY + ["lora.lora_rank=8", "steps=2",
                                             f"output_dir={tmp_path / 'ck'}"],
                           train_tasks=tasks("train", 6), val_tasks=tasks("val", 2),
                           make_env=lambda t: EvenBytes(), verbose=False)
    for root, _, files in os.walk(ck / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        make(tmp_path, "ck", 2)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_against_a_real_mlflow_server(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        t = make(tmp_path, "server", 2, tracking_uri=uri)
        t.train()
        run_id, exp_id = t.tracker.run_id, t.tracker.experiment_id
        t.close()
        mlflow.flush_trace_async_logging()
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["rollout.group_size"] == "4"
        hist = client.get_metric_history(run_id, "rollout/reward/mean")
        assert sorted(m.step for m in hist) == [1, 2]
        for name in ("val/greedy/reward/mean", "val/reward_pass_k_1", "train/loss",
                     "rollout/completion_rate",
                     "analysis/zero_adv_groups", "train/packing_efficiency"):
            assert name in run.data.metrics or client.get_metric_history(run_id, name), name
        mlflow.set_tracking_uri(uri)
        traces = mlflow.search_traces(run_id=run_id, locations=[exp_id], return_type="list")
        assert len(traces) >= 2  # one sample per step
        spans = traces[0].data.spans
        names = {s.name for s in spans}
        assert any(n.startswith("episode") for n in names) and "turn 0" in names
        root = next(s for s in spans if s.parent_id is None)
        assert "reward" in root.attributes and "finish_reason" in root.attributes
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
