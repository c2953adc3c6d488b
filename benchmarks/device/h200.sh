#!/usr/bin/env bash
# One call on the lent GPU machine (issue 24), designed to finish in about 8 minutes:
#   run(command="bash benchmarks/device/h200.sh", timeout_s=600)
# Writes $OUT/h200.json (commit it as benchmarks/results/h200.json) and prints each stage.
# Tested end to end on CPU with tiny shapes: tests/test_device_bench.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
python -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|orbax|chex|torch|transformers|peft|mlflow|aiohttp|safetensors|tokenizers) " || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
export PYTHONPATH=.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 560 python benchmarks/device/gpu_bench.py --out "${OUT:-/tmp}/h200.json" "$@"
