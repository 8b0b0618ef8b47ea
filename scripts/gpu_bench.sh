#!/usr/bin/env bash
# The GPU machine's run (docs/benchmarks.md): gpu-marked tests, then the offline benchmark sweep.
# Expects the device bundles installed (/opt/specattn-dev/env.sh) and long documents in .bench-docs/.
# Usage: bash scripts/gpu_bench.sh <out dir> [offline benchmark args...]
set -uo pipefail
out=${1:?out dir}; shift
source /opt/specattn-dev/env.sh
export SPECATTN_CACHE_DIR=/tmp/specattn-cache
# the repo's folders as the package specattn, without installing anything
mkdir -p /tmp/pkg/specattn
for d in engine kernels server loadtest; do ln -sfn "$PWD/$d" "/tmp/pkg/specattn/$d"; done
export PYTHONPATH=/tmp/pkg:$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
else
  echo "pytest is not installed here: GPU losslessness is checked by the benchmark's '= none' column" | tee "$out/gpu-tests.txt"
fi
python3 -m specattn.loadtest.offline --docs .bench-docs/*.txt --out "$out/gpu-bench" "$@" 2>"$out/bench-stderr.txt"
tail -5 "$out/bench-stderr.txt"
