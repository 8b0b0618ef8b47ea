#!/usr/bin/env python3
"""Probe: critical-token selection of a whole step, the one-launch Triton kernel against torch's top-k and sort.

Scores as a verification of the default model leaves them: [30 layers, batch, ctx] float32, a budget of
ceil(0.05 · ctx) per sequence. Per (ctx, batch): the kernel, its row held in registers at 4, 8 and 16 warps and read
in chunks of 2048 at 8 warps, checked against the torch path, then each timed as the engine calls it, budgets list
in, positions out (triton do_bench median, µs; the selection runs eagerly, between a verification and the next draft
chain); the engine path uses `launch_shape`'s choice. --other FILE: also another version of radix_select.py at its own
launch shape (an A/B of two kernel versions in one process; e.g. scripts/radix_select_digits.py).
Usage (GPU machine, from the repo root after `source scripts/gpu_env.sh`, which puts it and `specattn` on the path):
    python3 scripts/select_kernel_probe.py [--contexts 4096 8192] [--batches 1 16 ...] [--other FILE]
Prints a table; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from functools import partial

import torch
from triton.testing import do_bench

from specattn.kernels.radix_select import launch_shape, select_critical_tokens_triton
from specattn.kernels.selection import select_critical_tokens_batched, select_critical_tokens_torch

LAYERS = 30
WARPS = [4, 8, 16]  # the row in registers
CHUNKED = (2048, False, 8)


def us(fn) -> float:
    return 1000 * float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def triton_path(scores: torch.Tensor, budgets: list[int], shape: tuple[int, bool, int]) -> torch.Tensor:
    k = torch.tensor(budgets, dtype=torch.int32).to(scores.device, non_blocking=True)
    return select_critical_tokens_triton(scores, k, max(budgets), shape)


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("other_radix_select", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    ap.add_argument("--other", help="another version of kernels/radix_select.py, timed at its own launch shape")
    args = ap.parse_args()
    other = load_module(args.other) if args.other else None
    ok = True
    heads = " | ".join([f"registers, {w} warps" for w in WARPS] + ["chunks of 2048, 8 warps"])
    other_head = f" {args.other} |" if other else ""
    print(f"| ctx | batch | torch top-k + sort | {heads} |{other_head} engine path | speed-up |")
    print("|---:|---:|---:|" + "---:|" * (len(WARPS) + 1 + bool(other)) + "---:|---:|")
    for ctx in args.contexts:
        for batch in args.batches:
            scores = torch.rand(LAYERS, batch, ctx, device="cuda")
            budgets = [math.ceil(0.05 * ctx)] * batch
            ref = select_critical_tokens_torch(scores, budgets)
            times = [us(partial(select_critical_tokens_torch, scores, budgets))]
            block = launch_shape(ctx)[0]
            for shape in [(block, True, w) for w in WARPS] + [CHUNKED]:
                run = partial(triton_path, scores, budgets, shape)
                same = torch.equal(run(), ref)
                ok &= same
                times.append(us(run) if same else float("nan"))
            if other:
                k = torch.tensor(budgets, dtype=torch.int32, device="cuda")
                run = partial(other.select_critical_tokens_triton, scores, k, max(budgets))
                same = torch.equal(run(), ref)
                ok &= same
                times.append(us(run) if same else float("nan"))
            engine = partial(select_critical_tokens_batched, scores, budgets)
            ok &= torch.equal(engine(), ref)
            times.append(us(engine))
            cells = " | ".join(f"{t:.1f}" for t in times)
            print(f"| {ctx} | {batch} | {cells} | {times[0] / times[-1]:.1f}x |", flush=True)
    print("checks:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
