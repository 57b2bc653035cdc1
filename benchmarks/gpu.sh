#!/usr/bin/env bash
# Every GPU figure in one JSON (~5 minutes on an H100/H200): see benchmarks/gpu.py.
#   bash benchmarks/gpu.sh [OUT.json]
# Needs jax with its CUDA plugin, flax, optax; torch + timm for the comparison side (missing ones are
# recorded as skipped). With network, `pip install -r requirements-bench.txt` first if needed.
set -u
OUT="${1:-benchmarks/results/gpu.json}"
cd "$(dirname "$0")/.."
# JAX must not grab 75 % of the card up front: torch runs in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
python3 -c "import jax; print('devices:', jax.devices())" || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
timeout 420 python3 benchmarks/gpu.py --out "$OUT" "${@:2}"
echo "exit $? -> $OUT"
