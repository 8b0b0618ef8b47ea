#!/usr/bin/env bash
# The GPU machine's run (docs/benchmarks.md), in stages so one device call can do several:
#   tests    every gpu-marked test (FlashInfer and Triton kernels vs their torch references, engine losslessness)
#   kernels  scripts/gpu_kernel_bench.py: copy bandwidth, attention kernels, score kernel, top-k (check, then time)
#   bench    the offline benchmark (specattn-bench) with the arguments in $BENCH_ARGS
#   profile  scripts/profile_step.py: torch.profiler over decode steps of none and specattn ($PROFILE_ARGS)
#   serve    `specattn serve $SERVE_ARGS` (default: none, the GPU defaults) under a short HTTP load (specattn-loadtest
#            bench: 128 document prompts at concurrency 64, or $LOAD_ARGS), then its /metrics
#   jit      FlashInfer's JIT cache as jit.tar.xz, to carry to the next machine (see ../shared/device/README.md)
# Expects the device bundles installed (/opt/specattn-dev/env.sh) and long documents in .bench-docs/.
# Usage: bash scripts/gpu_bench.sh <out dir> <stage> [<stage> ...]
set -uo pipefail
out=${1:?out dir}; shift
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    tests)
      python3 -m pytest -q -s -m gpu tests/test_kernels.py tests/test_fused_layer.py tests/test_attention.py tests/test_gpu.py -p no:cacheprovider \
        > "$out/gpu-tests.txt" 2>&1
      grep -E "identical|passed|failed|Error|error" "$out/gpu-tests.txt" | tail -15 ;;
    kernels)
      # shellcheck disable=SC2086
      python3 scripts/gpu_kernel_bench.py --out "$out/kernels" ${KERNEL_ARGS:-} > "$out/kernels.log" 2>&1
      tail -30 "$out/kernels.log" ;;
    bench)
      # shellcheck disable=SC2086
      python3 -m specattn.loadtest.offline --docs .bench-docs/*.txt --out "$out/gpu-bench" ${BENCH_ARGS:-} 2>"$out/bench-stderr.txt"
      tail -3 "$out/bench-stderr.txt" ;;
    profile)
      # shellcheck disable=SC2086
      python3 scripts/profile_step.py --out "$out" ${PROFILE_ARGS:-} 2>&1 | grep -v dequantizing | tail -4 ;;
    serve)
      # shellcheck disable=SC2086
      python3 -m specattn.server.cli serve --port 8123 ${SERVE_ARGS:-} > "$out/serve.log" 2>&1 &
      pid=$!
      python3 - <<'PY'
import time, httpx
for _ in range(240):
    try:
        if httpx.get("http://127.0.0.1:8123/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
PY
      # shellcheck disable=SC2086
      python3 -m specattn.loadtest.cli bench --url http://127.0.0.1:8123 --dataset documents --docs .bench-docs/*.txt \
        --doc-chars 16000 --output-len 128 ${LOAD_ARGS:---num-prompts 128 --max-concurrency 64} --no-plots --no-progress \
        --out "$out/http-load" > "$out/http-load.txt" 2>&1
      python3 -c "import httpx; print(httpx.get('http://127.0.0.1:8123/metrics').text)" > "$out/metrics.txt"
      kill -TERM $pid; wait $pid
      grep "KV cache:" "$out/serve.log"; tail -25 "$out/http-load.txt"; grep -E "^specattn:(spec_decode_num|request_success|generation_tokens)" "$out/metrics.txt" ;;
    jit)
      tar cJf "$out/jit.tar.xz" -C /opt/specattn-dev jit && ls -la "$out/jit.tar.xz" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "== $stage: $(( $(date +%s) - start )) s"
done
