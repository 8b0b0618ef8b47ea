#!/usr/bin/env bash
# A/B of our Triton attention kernel (kernels/verify_attention.py) in the offline benchmark, in one run: the engine
# as shipped (our kernel for graph shapes at TRITON_PROGRAMS_PER_SM, scores kept in its pass), then
# with FlashInfer + the separate score kernel at every batch, then as shipped again, so machine drift shows.
# Usage (GPU machine, after gpu_bench.sh's setup): bash scripts/triton_attention_ab.sh <out dir> <offline benchmark args...>
set -uo pipefail
out=${1:?out dir}; shift
source scripts/gpu_env.sh
for run in triton flashinfer triton-again; do
  off=$([ "$run" = flashinfer ] && echo 1 || echo 0)
  python3 - --docs .bench-docs/*.txt --out "$out/ab-$run" "$@" 2>"$out/ab-$run.stderr" <<PY
import runpy, sys
import specattn.engine.flashinfer_attention as fa
if $off:
    fa.TRITON_PROGRAMS_PER_SM = (0, -1)
sys.argv[0] = "offline"
runpy.run_module("specattn.loadtest.offline", run_name="__main__")
PY
  echo "== $run"; grep "^| [0-9]" "$out/ab-$run.md"
done
