#!/usr/bin/env python3
"""Probe: the decoder layer's two input sides, fused (kernels/fused_linear.py: one launch each) against the three
launches they replace (the norm kernel, cuBLAS's projection, the RoPE/cache-write or SiLU·up kernel).

Shapes of the default model (hidden 576, 9 q heads and 3 KV heads of 64, intermediate 1536), 30 layers of distinct
weights as a forward reads them (from memory, not L2). Per row count (tokens of a forward: a decode batch, a
verification of batch × (γ + 1), a prefill chunk): each path checked against the torch composition, then a forward's
30 layers of it captured in a CUDA graph and timed (triton do_bench median, µs a layer), the fused path at each
BLOCK_M. Usage (GPU machine, from the repo root after `source scripts/gpu_env.sh`):
    python3 scripts/fused_linear_probe.py [--rows 1 16 128 ...]
Prints a table; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from specattn.engine.model import add_rms_norm, rope_write_kv, silu_mul
from specattn.kernels import fused_layer, fused_linear

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, EPS = 576, 9, 3, 64, 1536, 30, 1e-5
BLOCK_MS = [16, 32, 64]


def graphed_us(fn, layers: int) -> float:
    """µs a layer of `fn(layer)` run for every layer inside one CUDA graph (as the engine runs a forward)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(layers):  # warm-up: compiles, cuBLAS handles
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    return 1000 * float(do_bench(graph.replay, warmup=10, rep=100, return_mode="median")) / layers


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128, 256, 640, 1280, 2048, 4096])
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, device=dev) * scale + offset).to(dt)

    qkv_w = [rand((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
    gate_up_w = [rand(2 * INTER, HIDDEN, scale=2 * HIDDEN**-0.5) for _ in range(LAYERS)]
    norm_w = [rand(HIDDEN, scale=0.1, offset=1.0) for _ in range(LAYERS)]
    ok = True
    cols = " | ".join(f"fused, BLOCK_M {b}" for b in BLOCK_MS)
    print(f"| rows | side | 3 launches | {cols} | best speed-up |")
    print("|---:|---|---:|" + "---:|" * len(BLOCK_MS) + "---:|")
    for rows in args.rows:
        x, residual = rand(rows, HIDDEN), rand(rows, HIDDEN, scale=3.0)
        angles = torch.rand(rows, HEAD_DIM // 2, device=dev) * 100
        cos, sin = angles.cos(), angles.sin()
        slots = torch.randperm(4 * rows, device=dev)[:rows]
        caches = [rand(4 * rows, KV_HEADS, HEAD_DIM) for _ in range(2)]

        def qkv_old(i, torch_ops=False):
            norm = add_rms_norm if torch_ops else fused_layer.add_rms_norm
            rope = rope_write_kv if torch_ops else fused_layer.rope_write_kv
            normed, h = norm(x, residual, norm_w[i], EPS)
            qkv = F.linear(normed, qkv_w[i])
            qk = qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(rows, HEADS + KV_HEADS, HEAD_DIM)
            v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(rows, KV_HEADS, HEAD_DIM)
            return rope(qk, v, cos, sin, *caches, slots), h

        def qkv_new(i):
            return fused_linear.norm_qkv_rope(x, residual, norm_w[i], EPS, qkv_w[i], None, None, None, cos, sin,
                                              *caches, slots)

        def mlp_old(i, torch_ops=False):
            norm = add_rms_norm if torch_ops else fused_layer.add_rms_norm
            act = silu_mul if torch_ops else fused_layer.silu_mul
            normed, h = norm(x, residual, norm_w[i], EPS)
            return act(F.linear(normed, gate_up_w[i])), h

        def mlp_new(i):
            return fused_linear.norm_gate_up_silu(x, residual, norm_w[i], EPS, gate_up_w[i])

        for side, old, new in [("q/k/v", qkv_old, qkv_new), ("gate/up", mlp_old, mlp_new)]:
            times = [graphed_us(old, LAYERS)]
            for block_m in BLOCK_MS:
                fused_linear.BLOCK_M = block_m
                ref, got = old(0, torch_ops=True), new(0)
                err = ((got[0].float() - ref[0].float()).norm() / ref[0].float().norm()).item()
                good = err < 2e-2 and torch.equal(got[1], ref[1])
                if not good:
                    print(f"CHECK FAILED rows {rows} {side} BLOCK_M {block_m}: rel err {err:.2e}", file=sys.stderr)
                ok &= good
                times.append(graphed_us(new, LAYERS))
            cells = " | ".join(f"{t:.1f}" for t in times)
            print(f"| {rows} | {side} | {cells} | {times[0] / min(times[1:]):.2f}× |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
