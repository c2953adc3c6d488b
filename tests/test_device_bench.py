"""The device script (benchmarks/device/gpu_bench.py, issue 24) runs end to end on CPU with tiny
shapes: every stage measures something and the JSON holds it (the GPU run uses the same code)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~2.5 min alone (compiles of three programs, the torch peer twice)
def test_the_device_benchmark_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "d.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "device", "gpu_bench.py"), "--tiny",
         "--only", "train,decode,rl", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["complete"] and rec["fingerprint"]["backend"] == "cpu"
    train = rec["stages"]["train"]["result"]["tiny"]
    assert train["ours"]["tokens_per_s"] > 0 and train["peer"]["tokens_per_s"] > 0
    assert train["ratio_vs_peer"] > 0 and train["ours"]["compiles_after_first"] == 0
    dec = rec["stages"]["decode"]["result"]["batch4"]
    assert dec["ours"]["decode_tokens_per_s"] > 0 and dec["ratio_vs_peer"] > 0
    assert 0 < dec["ours"]["bandwidth_share"]
    rl = rec["stages"]["rl"]["result"]
    assert len(rl["steps"]) == 2 and all(s["time/step_s"] > 0 for s in rl["steps"])
