#!/usr/bin/env bash
# The prepared GPU study (benchmarks/gpu_study.py): one cell of configs/study/scratch_vs_pretrained_gpu.yaml end to
# end in one call, stopped at 550 s (the device call's limit is 600); results under $OUT (else --out). The lent
# machine has torch but not ray/av/webdataset: when they do not import, the bundle of ../shared/gpu/bundle.sh
# (.gpu-site/site.tar.xz, carried with the call) is unpacked to /tmp/site first. `bash benchmarks/gpu_study.sh --tiny`
# runs the CPU version.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import ray, av, webdataset" 2>/dev/null && [ -f .gpu-site/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .gpu-site/site.tar.xz -C /tmp/site
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi || echo "gpu_study: nvidia-smi not found"
timeout "${STUDY_TIMEOUT_S:-550}" "$PY" benchmarks/gpu_study.py "$@"
