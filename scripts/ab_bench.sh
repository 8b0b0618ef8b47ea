#!/usr/bin/env bash
# A/B of the engine against an older tree of it, in the offline benchmark, in one run: this tree, then the old one,
# then this one again, so machine drift shows. The old tree holds the old engine/ and kernels/ folders, e.g.
#   mkdir -p ab-old && git archive <commit> engine kernels | tar -x -C ab-old   (git-ignored: the device call carries it)
# Usage (GPU machine, after gpu_bench.sh's setup): bash scripts/ab_bench.sh <out dir> <old tree> <offline benchmark args...>
set -uo pipefail
out=${1:?out dir}; old=$(realpath "${2:?old tree}"); shift 2
source scripts/gpu_env.sh
mkdir -p /tmp/pkg-old/specattn
for d in server loadtest; do ln -sfn "$PWD/$d" "/tmp/pkg-old/specattn/$d"; done
for d in engine kernels; do ln -sfn "$old/$d" "/tmp/pkg-old/specattn/$d"; done
for run in new old new-again; do
  pkg=$([ "$run" = old ] && echo /tmp/pkg-old || echo /tmp/pkg)
  PYTHONPATH=${PYTHONPATH/\/tmp\/pkg:/$pkg:} python3 -m specattn.loadtest.offline --docs .bench-docs/*.txt --out "$out/ab-$run" "$@" \
    2>"$out/ab-$run.stderr"
  echo "== $run"; grep "^| [0-9]" "$out/ab-$run.md"
done
