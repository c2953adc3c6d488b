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


def _run(mode: str, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
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
