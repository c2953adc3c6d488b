#!/usr/bin/env bash
# One call on the lent GPU machine (issue 24), designed to finish in about 8 minutes:
#   run(command="bash benchmarks/device/h200.sh", timeout_s=600)
# Writes $OUT/h200.json (commit it as benchmarks/results/h200.json) and prints each stage.
# Estimated, not measured (2026-12-04, with the attention stage and the second attention path of
# the train stage): ~9-14 min in all, so the 560 s cap may cut decode and rl off; the JSON keeps
# every finished stage. Then a second call finishes them:
#   run(command="bash benchmarks/device/h200.sh --only decode,rl --out $OUT/h200_part2.json")
# Tested end to end on CPU with tiny shapes: tests/test_device_bench.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
python -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|orbax|chex|torch|transformers|peft|mlflow|aiohttp|safetensors|tokenizers) " || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 560 python benchmarks/device/gpu_bench.py --out "${OUT:-/tmp}/h200.json" "$@"
