"""The update step on several processes (jax.distributed, gloo collectives on CPU): 2 processes
x 2 devices give what 1 process x 4 devices gives, and both what one unsharded device gives."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtrl_jax.serving.launch import free_port
from mtrl_jax.training import distributed
from mtrl_jax.training.update import _pad_rows

ROOT = Path(__file__).resolve().parent.parent


def _run(mode: str, out: Path, *extra: str, attention: str = "xla") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MTRL_CHECK_ATTENTION=attention)
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "tests.distributed_check", mode, str(out),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    try:
        for p in procs:
            log, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, log[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# ~75 s; the default run covers 2 x 2 vs 1 x 4 end to end (the mtrl train test below)
@pytest.mark.slow
def test_two_processes_give_the_update_of_one_process_with_the_same_mesh(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    multi = [_run("multi", tmp_path / "multi.npz", str(i), coordinator) for i in range(2)]
    _wait(multi)  # (the processes join each other: started together, waited together)
    _wait([_run("mesh", tmp_path / "mesh.npz")])
    _wait([_run("ref", tmp_path / "ref.npz")])
    r = {m: np.load(tmp_path / f"{m}.npz") for m in ("ref", "mesh", "multi")}
    assert (int(r["multi"]["processes"]), int(r["multi"]["devices"])) == (2, 4)
    assert (int(r["mesh"]["processes"]), int(r["mesh"]["devices"])) == (1, 4)
    # the LoRA weights really are split, and each process holds only its own shards
    assert str(r["multi"]["lora_spec"]) == "P('tensor', None)"
    assert int(r["multi"]["lora_local_shards"]) == 2 and int(r["mesh"]["lora_local_shards"]) == 4
    names = list(r["ref"]["metric_names"])
    assert "train/kl" in names and "train/ratio_max" in names  # KL and 2 mini-batches ran
    n = len([k for k in r["ref"].files if k.startswith("lora") and k[4:].isdigit()])
    assert n > 0
    for i in range(n):  # 2 x 2 equals 1 x 4 (the same programs and collectives, to 1e-6)
        np.testing.assert_allclose(r["multi"][f"lora{i}"], r["mesh"][f"lora{i}"], atol=1e-6)
    np.testing.assert_allclose(r["multi"]["metric_values"], r["mesh"]["metric_values"],
                               rtol=1e-6, atol=1e-9)
    # and both equal one unsharded device up to float summation order
    np.testing.assert_allclose(r["multi"]["metric_values"], r["ref"]["metric_values"],
                               rtol=1e-5, atol=1e-7)
    moved = max(float(np.abs(r["ref"][f"lora{i}"]).max()) for i in range(n))
    diff = max(float(np.abs(r["multi"][f"lora{i}"] - r["ref"][f"lora{i}"]).max())
               for i in range(n))
    assert moved > 0.05 and diff < 1e-3 * moved


def test_the_pallas_kernel_runs_shard_by_shard_on_the_mesh(tmp_path):
    """The update step on a data=2 x tensor=2 mesh of 4 CPU devices with ``attention: pallas``
    (the kernel in interpret mode under ``jax.shard_map``: rows over ``data``, heads over
    ``tensor``) equals one unsharded device on the XLA path."""
    _wait([_run("mesh", tmp_path / "mesh.npz", attention="pallas"),
           _run("ref", tmp_path / "ref.npz")])
    mesh, ref = np.load(tmp_path / "mesh.npz"), np.load(tmp_path / "ref.npz")
    assert int(mesh["devices"]) == 4 and int(ref["devices"]) == 1
    # traced under the mesh: one shard_map per layer and program (forward, old and reference
    # log-probs, train step); none on one device
    assert int(mesh["shard_maps"]) >= 2 and int(ref["shard_maps"]) == 0
    assert list(mesh["metric_names"]) == list(ref["metric_names"])
    np.testing.assert_allclose(mesh["metric_values"], ref["metric_values"], rtol=1e-5, atol=1e-7)
    n = len([k for k in ref.files if k.startswith("lora") and k[4:].isdigit()])
    moved = max(float(np.abs(ref[f"lora{i}"]).max()) for i in range(n))
    diff = max(float(np.abs(mesh[f"lora{i}"] - ref[f"lora{i}"]).max()) for i in range(n))
    assert moved > 0.05 and diff < 1e-3 * moved


def test_initialize_alone_is_a_no_op_and_bad_settings_are_named(monkeypatch):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
              distributed.ENV_PROCESS_ID, distributed.ENV_AUTO):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.requested()
    assert distributed.initialize() == distributed.ProcessInfo(0, 1, None)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    assert distributed.requested()
    with pytest.raises(ValueError, match="MTRL_COORDINATOR and MTRL_PROCESS_ID"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match=r"MTRL_PROCESS_ID=2 is not in \[0, 2\)"):
        distributed.initialize()


def test_padding_rows_are_empty_and_reach_the_multiple():
    arrays = {"tokens": np.ones((5, 4), np.int32), "segment_ids": np.ones((5, 4), np.int32),
              "advantages": np.full((5, 4), 0.5, np.float32)}
    out = _pad_rows(arrays, 4)
    assert out["tokens"].shape == (8, 4) and out["advantages"].dtype == np.float32
    assert (out["segment_ids"][5:] == 0).all() and (out["tokens"][:5] == 1).all()
    assert _pad_rows(arrays, 5) is arrays


RECIPE = """\
model:
  tiny: {hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 2,
         head_dim: 16, tie_word_embeddings: true}
lora: {lora_rank: 4}
data: {task: "evenbytes:any", n_train: 16, n_val: 2, n_test: 2}
rollout: {batch_size: 2, group_size: 4, max_turns: 1, sampling_max_tokens: 16,
          max_context_tokens: 256}
val_sampling_params: {sampling_max_tokens: 8, num_samples: 0}
optimizer: {learning_rate: 0.05, mini_batches: 2}
algorithm: {kl_coef: 0.05}
packing: {row_lengths: [256], row_multiple: 1}
mesh: {tensor: 2}
eval_interval: 0
checkpoint_interval: 2
tracker: jsonl
"""


def _train(tmp_path, out: str, *args: str, devices: int = 4, **popen) -> subprocess.Popen:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(
        [sys.executable, "-m", "mtrl_jax.cli", "train", "--import",
         str(ROOT / "tests" / "async_envs.py"), "--recipe", str(recipe),
         f"output_dir={tmp_path / out}", *args], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return log


def _train_metrics(run) -> dict:
    import json

    out = {}
    with open(run / "tracking" / "metrics.jsonl") as f:
        for line in f:
            d = json.loads(line)
            if d["name"] in ("train/loss", "train/grad_norm", "train/kl", "rollout/reward/mean"):
                out[d["step"], d["name"]] = d["value"]
    return out


def _adapter(run) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_mtrl_train_on_two_processes_equals_one_and_resumes_on_one(tmp_path):
    """``mtrl train --num-processes 2`` (2 processes x 2 CPU devices: a mesh of data=2 x
    tensor=2 over the 4) trains what one process with the same 4-device mesh trains; killed
    with SIGTERM, it resumes on one process and ends where the uninterrupted run ends."""
    import signal
    import time

    one = _train(tmp_path, "one", "steps=4", "mesh.shard=always")
    log_one = _finish(one)
    assert one.returncode == 0, log_one[-3000:]
    two = _train(tmp_path, "two", "steps=4", "--num-processes", "2",
                 "--devices-per-process", "2")
    log_two = _finish(two)
    assert two.returncode == 0, log_two[-3000:]
    assert "process 1: 4 updates; done" in log_two
    a, b = _train_metrics(tmp_path / "one"), _train_metrics(tmp_path / "two")
    assert len(a) == 16 and a.keys() == b.keys()
    assert max(abs(a[k]) for k in a if k[1] == "train/loss") > 1e-4  # the policy learns
    for k in a:  # the same steps: summation order across processes aside
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    wa, wb = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert max(float(np.abs(wa[k]).max()) for k in wa if "lora_B" in k) > 0.01
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=1e-5)

    # SIGTERM to the launcher: process 0 saves a checkpoint and releases process 1
    killed = _train(tmp_path, "killed", "steps=1000", "--num-processes", "2",
                    "--devices-per-process", "2")
    try:
        deadline = time.time() + 300
        line = ""
        while "step    2/" not in line and time.time() < deadline:
            line = killed.stdout.readline()
            assert line or killed.poll() is None
        assert "step    2/" in line
        killed.send_signal(signal.SIGTERM)
        log_killed = _finish(killed, 120)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == 143, log_killed[-3000:]
    saved = sorted(int(x) for x in os.listdir(tmp_path / "killed" / "checkpoints")
                   if x.isdigit())
    assert saved and 2 <= saved[-1] < 4
    # written collectively: each process its own shards (the LoRA A/B matrices are split over
    # the fsdp axis, which spans the two processes)
    state = tmp_path / "killed" / "checkpoints" / str(saved[-1]) / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state)), os.listdir(state)
    # resumed by one process (4 devices, the same mesh): it ends where the uninterrupted run
    # ended
    resumed = _train(tmp_path, "killed", "steps=4", "mesh.shard=always")
    log_resumed = _finish(resumed)
    assert resumed.returncode == 0, log_resumed[-3000:]
    assert f"resumed from step {saved[-1]}" in log_resumed
    wc = _adapter(tmp_path / "killed")
    for k in wa:
        np.testing.assert_allclose(wc[k], wa[k], atol=1e-4)


@pytest.mark.slow  # ~40 s; the 2-process run above covers the protocol in the default run
def test_a_dead_process_fails_the_job_fast_and_keeps_the_last_checkpoint(tmp_path):
    import signal
    import time

    job = _train(tmp_path, "run", "steps=1000", "--num-processes", "2",
                 "--devices-per-process", "2")
    try:
        deadline = time.time() + 300
        line = ""
        while "step    2/" not in line and time.time() < deadline:
            line = job.stdout.readline()
            assert line or job.poll() is None
        follower = None
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if b"MTRL_PROCESS_ID=1" in env and \
                    f"output_dir={tmp_path / 'run'}".encode() in open(
                        f"/proc/{pid}/cmdline", "rb").read():
                follower = int(pid)
        assert follower is not None
        os.kill(follower, signal.SIGKILL)
        t0 = time.time()
        log = _finish(job, 120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, log[-3000:]
    assert time.time() - t0 < 60  # nobody waits forever on the dead process
    assert "process 1 exited with -9" in log
    assert any(x.isdigit() for x in os.listdir(tmp_path / "run" / "checkpoints"))
