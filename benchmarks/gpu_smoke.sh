#!/usr/bin/env bash
# The prepared GPU reading (benchmarks/gpu_smoke.py): one short call on a machine with a GPU, <= 9 minutes on
# one H100/H200. Writes benchmarks/results/gpu_smoke_<device>.json; TORCH_LOGS=recompiles puts every
# recompile in the log. `bash benchmarks/gpu_smoke.sh --dry-run` runs the CPU version.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi || echo "gpu_smoke: nvidia-smi not found"
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
timeout "${SMOKE_TIMEOUT_S:-540}" "$PY" benchmarks/gpu_smoke.py "$@"
