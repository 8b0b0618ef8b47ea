#!/usr/bin/env python3
"""Probe: the sparse draft attention kernel with its slots split over 1, 2, 4, 8 programs per (sequence, KV head).

One layer of the default model (9 query heads, 3 KV heads, head_dim 64, bf16): each sequence attends
ceil(0.05 · ctx) selected slots scattered over a cache of batch · ctx slots plus 8 recent ones, as a draft at 8k
does. Per batch size: each split count checked against one split (the merge must not change the output beyond
bf16 rounding), then timed (triton do_bench median, µs, replayed from a CUDA graph of 30 calls: a draft forward
runs it once per layer inside a graph), and the count `draft_splits` picks for this GPU marked.
Usage (GPU machine, from the repo root after `source scripts/gpu_env.sh`, which puts it and `specattn` on the path):
    python3 scripts/draft_kernel_probe.py [--ctx 8192] [--batches 1 16 ...]
Prints a table; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial

import torch
from triton.testing import do_bench

from scripts.gpu_kernel_bench import graph_of, repeat
from specattn.kernels.draft_attention import draft_splits, sparse_draft_attention

HEADS, KV_HEADS, D, LAYERS, RECENT = 9, 3, 64, 30, 8
DTYPE = torch.bfloat16


def graph_us(fn) -> float:
    """µs per call of fn, replayed LAYERS times from one CUDA graph."""
    return 1000 * float(do_bench(graph_of(partial(repeat, LAYERS, fn)).replay, warmup=25, rep=100,
                                 return_mode="median")) / LAYERS


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    budget = math.ceil(0.05 * args.ctx)
    ok = True
    print("| batch | 1 split | 2 splits | 4 splits | 8 splits | picked |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        slots = batch * args.ctx
        k = torch.randn(slots, KV_HEADS, D, device="cuda", dtype=DTYPE)
        v = torch.randn_like(k)
        q = torch.randn(batch, HEADS, D, device="cuda", dtype=DTYPE)
        selected = torch.randint(0, slots, (batch * budget,), device="cuda", dtype=torch.int32)
        sel_indptr = torch.arange(0, batch * budget + 1, budget, device="cuda", dtype=torch.int32)
        recent = torch.randint(0, slots, (batch, RECENT), device="cuda", dtype=torch.int32)
        counts = torch.full((batch,), RECENT, device="cuda", dtype=torch.int32)

        def run(splits: int) -> torch.Tensor:
            return sparse_draft_attention(q, k, v, selected, sel_indptr, recent, counts, D**-0.5, splits=splits)

        one = run(1).float()
        cells = []
        for splits in (1, 2, 4, 8):
            err = (run(splits).float() - one).abs().max().item()
            if err > 2e-2:
                ok = False
                print(f"FAIL batch {batch} splits {splits}: max abs error {err:.3g} against one split", flush=True)
            cells.append(f"{graph_us(lambda s=splits: run(s)):.1f}")
        print(f"| {batch} | {' | '.join(cells)} | {draft_splits(batch, KV_HEADS, sms)} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
