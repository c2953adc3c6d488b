"""Sharded (8 simulated CPU devices, mesh data=2 x fsdp=2 x tensor=2) equals single-device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# qwen3 (q/k norms) in the default run; qwen2 (qkv bias) with `-m slow` (CI time budget)
@pytest.mark.parametrize("layout", [pytest.param("qwen2", marks=pytest.mark.slow), "qwen3"])
def test_sharded_forward_logprobs_and_lora_step_match_single_device(layout):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_check", layout], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8
    # parameters really are split: q kernel [in, out] over fsdp x tensor -> [in/2, out/2] shards
    # (each held twice: replicated over the data axis)
    assert r["specs"][0] == "P('fsdp', 'tensor')"
    assert r["q_shards"] == 8 and r["q_shard_shape"] == [d // 2 for d in r["q_shape"]]
    assert r["specs"][1] == "P('tensor', None)"  # row-parallel LoRA A
    # embedding [101, 64]: 101 rows do not split over tensor=2, so only fsdp shards it
    assert r["loaded_embed_spec"] == "P(None, 'fsdp')"
    assert r["logits_diff"] < 1e-4
    assert r["logprob_diff"] < 1e-4
    assert abs(r["loss"][0] - r["loss"][1]) < 1e-5
    assert abs(r["gnorm"][0] - r["gnorm"][1]) < 1e-4 * r["gnorm"][0]
    assert r["lora_moved"] > 0.1 and r["lora_diff"] < 1e-5
    assert r["load_diff"] < 1e-4
