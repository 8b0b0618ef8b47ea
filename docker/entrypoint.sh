#!/bin/sh
# The container's entry command: `specattn serve`, configured by SPECATTN_* environment variables;
# arguments given to the container (its CMD) follow and win, since a later flag overrides an earlier one.
# Outside Docker it behaves the same (the tests run it with the image's arguments).
set -eu

set -- serve \
    --host "${SPECATTN_HOST:-0.0.0.0}" \
    --port "${SPECATTN_PORT:-8000}" \
    ${SPECATTN_MODEL:+--model "$SPECATTN_MODEL"} \
    ${SPECATTN_SERVED_MODEL_NAME:+--served-model-name "$SPECATTN_SERVED_MODEL_NAME"} \
    ${SPECATTN_DEVICE:+--device "$SPECATTN_DEVICE"} \
    ${SPECATTN_DTYPE:+--dtype "$SPECATTN_DTYPE"} \
    ${SPECATTN_NUM_PAGES:+--num-pages "$SPECATTN_NUM_PAGES"} \
    ${SPECATTN_PAGE_SIZE:+--page-size "$SPECATTN_PAGE_SIZE"} \
    ${SPECATTN_GPU_MEMORY_UTILIZATION:+--gpu-memory-utilization "$SPECATTN_GPU_MEMORY_UTILIZATION"} \
    ${SPECATTN_MAX_NUM_SEQS:+--max-num-seqs "$SPECATTN_MAX_NUM_SEQS"} \
    ${SPECATTN_MAX_NUM_BATCHED_TOKENS:+--max-num-batched-tokens "$SPECATTN_MAX_NUM_BATCHED_TOKENS"} \
    ${SPECATTN_DRAFTER:+--drafter "$SPECATTN_DRAFTER"} \
    ${SPECATTN_GAMMA:+--gamma "$SPECATTN_GAMMA"} \
    ${SPECATTN_MAX_QUEUE:+--max-queue "$SPECATTN_MAX_QUEUE"} \
    ${SPECATTN_SHUTDOWN_GRACE:+--shutdown-grace "$SPECATTN_SHUTDOWN_GRACE"} \
    ${SPECATTN_LOG_LEVEL:+--log-level "$SPECATTN_LOG_LEVEL"} \
    "$@"
if [ "${SPECATTN_ADAPTIVE:-1}" = "0" ]; then
    set -- "$@" --no-adaptive
fi
# SPECATTN_API_KEY is read by `specattn serve` itself (never put a key on a command line)
exec specattn "$@"
