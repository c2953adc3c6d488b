"""The trainer end to end on a tiny random byte-level model and a custom environment.

The environment rewards the share of even byte values in the last assistant turn, so a random
policy gets varied rewards, non-zero advantages and real LoRA updates.
"""

import json
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


def _interrupt_at(trainer, phase, sig, when=1):
    """Send ``sig`` to this process (a real signal) at the ``when``-th entry into ``phase``
    of ``trainer``: ``rollout`` (the rollout source), ``update`` (the optimizer step),
    ``validation`` (playing the val split) or ``checkpoint`` (inside the checkpoint write)."""
    calls = {"n": 0}

    def wrap(fn):
        def inner(*a, **k):
            calls["n"] += 1
            if calls["n"] == when:
                os.kill(os.getpid(), sig)
            return fn(*a, **k)
        return inner

    if phase == "rollout":
        trainer.source.episodes = wrap(trainer.source.episodes)
    elif phase == "update":
        trainer.updater = wrap(trainer.updater)
    elif phase == "validation":
        import mtrl_jax.training.trainer as tr_mod
        real = tr_mod.play_task_set
        tr_mod.play_task_set = wrap(real)
        trainer._restore_play = lambda: setattr(tr_mod, "play_task_set", real)
    elif phase == "checkpoint":
        trainer.checkpoints.save = wrap(trainer.checkpoints.save)
    return calls


def _histories(tracker, keys):
    return {k: sorted(tracker.metric_history(k)) for k in keys}


def test_resume_is_exact_after_signals_in_every_phase(tmp_path):
    """SIGINT/SIGTERM (real signals) during rollouts, validation, the update and a checkpoint
    write each stop the run with a checkpoint; resuming after each gives exactly the straight
    run: every metric at every step once, the same ledger and the same weights."""
    import signal

    EvenBytes.nan_on_call = set()
    straight = make(tmp_path, "straight", 4)
    hist = straight.train()
    straight.close()
    assert len(hist) == 4
    assert any(abs(m["train/grad_norm"]) > 0 for m in hist)  # real updates happened

    chain = [("rollout", signal.SIGINT, 2, 1),     # in step 2's rollouts: saves step 1
             ("validation", signal.SIGTERM, 1, 2),  # in step 2's validation: saves step 2
             ("update", signal.SIGTERM, 1, 2),      # in step 3's update: step 2 is saved
             ("checkpoint", signal.SIGINT, 1, 4)]   # in step 4's checkpoint write: held
    for i, (phase, sig, when, saved) in enumerate(chain):
        if i == 3:  # an empty newer checkpoint folder (a write cut short) is skipped
            os.makedirs(tmp_path / "resumed" / "checkpoints" / "3")
        t = make(tmp_path, "resumed", 4)
        assert t.step == [0, 1, 2, 2][i]
        calls = _interrupt_at(t, phase, sig, when)
        with pytest.raises(KeyboardInterrupt) as info:
            t.train()
        getattr(t, "_restore_play", lambda: None)()
        t.close()
        assert calls["n"] >= when, phase
        assert info.value.args[0] == signal.Signals(sig).name, phase
        assert t.checkpoints.latest_step() == saved, phase
        assert t.tracker.client.get_run(t.tracker.run_id).info.status == "KILLED"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    moved = os.listdir(tmp_path / "resumed" / "checkpoints_unusable")
    assert len(moved) == 1 and moved[0].startswith("3-")
    last = make(tmp_path, "resumed", 4)
    assert last.step == 4 and last.data_pos == 4 * 2
    assert last.train() == []  # nothing left to train, nothing logged twice
    last.close()

    for x, y in zip(_lora_leaves(straight), _lora_leaves(last), strict=True):
        np.testing.assert_array_equal(x, y)
    keys = [k for k in hist[0] if not k.startswith(("time/", "throughput/"))]
    keys += [k for k in hist[1] if k.startswith("val/")]
    a, b = _histories(straight.tracker, keys), _histories(last.tracker, keys)
    for k in keys:
        assert len(a[k]) == len(b[k]), k  # no step lost or logged twice
        for (sa, va), (sb, vb) in zip(a[k], b[k], strict=True):
            assert sa == sb and ((math.isnan(va) and math.isnan(vb)) or va == vb), k
    ledger = [json.loads(x) for x in open(tmp_path / "resumed" / "rollout_ledger.jsonl")]
    straight_ledger = [json.loads(x) for x in open(tmp_path / "straight" /
                                                    "rollout_ledger.jsonl")]
    assert [r["step"] for r in ledger] == [0, 1, 2, 3]
    assert [r["episodes"] for r in ledger] == [r["episodes"] for r in straight_ledger]

    # each trainer logs to its own run folder's store (mlflow.set_tracking_uri exports
    # MLFLOW_TRACKING_URI; the tracker must not let the first store capture later trainers)
    assert "straight" in straight.tracker.uri and "resumed" in last.tracker.uri
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
    # every attempt continued the same MLflow run, which ends FINISHED
    assert t.tracker.run_id == last.tracker.run_id
    assert last.tracker.client.get_run(last.tracker.run_id).info.status == "FINISHED"
    # the adapter was exported
    assert os.path.exists(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")


def test_a_step_says_where_its_rollout_time_went(tmp_path):
    t = make(tmp_path, "where", 1)
    m = t.train_step()
    t.close()
    dec, out, roll = (m["time/rollout_decode_s"], m["time/rollout_outside_decode_s"],
                      m["time/rollout_s"])
    assert 0 < dec <= roll and out >= 0
    assert dec + out == pytest.approx(roll, rel=0.2, abs=0.05)  # the source adds a little
    # the share of the fixed-batch decode calls' slot-steps that sampled a token
    assert 0 < m["rollout/decode_slot_use"] <= 1


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
    # mini-batches of tree-packed rows (each row holds its own copy of the prefix)
    assert t.history[0]["train/shared_prefix_saving"] > 0.3
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
