#!/usr/bin/env python3
"""Probe: does a draft chain run beside a verification? Two half-batches, one verifying while the other drafts.

A SpecAttn step at 8k × 128 runs its four draft forwards (latency-bound: ≈ 270 small kernels each, few SMs busy)
and then its verification (bandwidth-bound: the full K/V read), one after the other. If the batch's two halves took
turns — half A's verification on one stream while half B drafts on another — the drafts' latency could hide under
the verification's memory traffic. This probe measures whether the GPU overlaps the two, with the default model's
shapes and random weights, each side captured as a CUDA graph:
  verify(B)  a verification forward for B sequences × 5 rows at context ctx: 30 layers of the four projections
             (cuBLAS), the fused norm / RoPE + cache write / SiLU·up kernels and our verification attention kernel
             over the full paged K/V (no scoring), then the LM head and argmax
  drafts(B)  γ = 4 draft forwards for B sequences: the same layers with the sparse draft attention over
             ceil(0.05 · ctx) + 8 slots, each forward's LM head and argmax feeding the next
Each side's outputs after an overlapped run are checked against a sequential run's (the two must not share
buffers). Prints ms (triton do_bench median): each side alone at B and B/2; the engine's step (verify(B), then
drafts(B)); the two halves overlapped (verify(B/2) on one stream, drafts(B/2) on another, both captured in one
CUDA graph as parallel branches); a pipelined step is two such overlaps.
Usage (GPU machine, from the repo root after `source scripts/gpu_env.sh`):
    python3 scripts/overlap_probe.py [--ctx 8192] [--batch 128]
Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from scripts.gpu_kernel_bench import graph_of
from specattn.kernels import fused_layer
from specattn.kernels.draft_attention import draft_splits, sparse_draft_attention
from specattn.kernels.verify_attention import verify_attention

HIDDEN, HEADS, KV_HEADS, D, INTER, LAYERS, VOCAB, EPS = 576, 9, 3, 64, 1536, 30, 49152, 1e-5
GAMMA, PAGE, RECENT = 4, 16, 8
DTYPE = torch.bfloat16


@dataclass
class Layer:
    n1: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    n2: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def rand(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale + offset).to(DTYPE)


class Model:
    """The default model's decoder with random weights; attention is the caller's."""

    def __init__(self):
        self.embed = rand(VOCAB, HIDDEN)
        self.final_norm = rand(HIDDEN, scale=0.1, offset=1.0)
        self.layers = [
            Layer(rand(HIDDEN, scale=0.1, offset=1.0), rand((HEADS + 2 * KV_HEADS) * D, HIDDEN, scale=HIDDEN**-0.5),
                  rand(HIDDEN, HEADS * D, scale=HIDDEN**-0.5), rand(HIDDEN, scale=0.1, offset=1.0),
                  rand(2 * INTER, HIDDEN, scale=HIDDEN**-0.5), rand(HIDDEN, INTER, scale=INTER**-0.5))
            for _ in range(LAYERS)
        ]

    def next_tokens(self, tokens: torch.Tensor, attention, scratch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        rows = tokens.shape[0]
        cos, sin, k_new, v_new, slots = scratch
        delta, residual = self.embed[tokens], None
        for w in self.layers:
            x, residual = fused_layer.add_rms_norm(delta, residual, w.n1, EPS)
            qkv = F.linear(x, w.qkv)
            qk = qkv[:, : (HEADS + KV_HEADS) * D].view(rows, HEADS + KV_HEADS, D)
            v = qkv[:, (HEADS + KV_HEADS) * D :].view(rows, KV_HEADS, D)
            q = fused_layer.rope_write_kv(qk, v, cos, sin, k_new, v_new, slots)
            x, residual = fused_layer.add_rms_norm(F.linear(attention(q).reshape(rows, HEADS * D), w.o), residual,
                                                   w.n2, EPS)
            delta = F.linear(fused_layer.silu_mul(F.linear(x, w.gate_up)), w.down)
        hidden = fused_layer.add_rms_norm(delta, residual, self.final_norm, EPS)[0]
        return F.linear(hidden, self.embed).float().argmax(dim=-1)


def scratch(rows: int) -> tuple[torch.Tensor, ...]:
    """RoPE tables and a K/V scratch the forward's new rows are written to (the caches read are not written)."""
    angles = torch.rand(rows, D // 2, device="cuda") * 100
    k_new = torch.empty(rows, KV_HEADS, D, device="cuda", dtype=DTYPE)
    return angles.cos(), angles.sin(), k_new, torch.empty_like(k_new), torch.arange(rows, device="cuda")


def sides(model: Model, k: torch.Tensor, v: torch.Tensor, batch: int, ctx: int):
    """verify() and drafts() for batch sequences whose pages are scattered over the cache, each returning its tokens."""
    pages_per_seq = ctx // PAGE
    page_indices = (torch.randperm(k.shape[0] // PAGE, device="cuda")[: batch * pages_per_seq]).to(torch.int32)
    page_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * pages_per_seq
    kv_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    verify_tokens = torch.randint(0, VOCAB, (batch * (GAMMA + 1),), device="cuda")
    verify_scratch = scratch(batch * (GAMMA + 1))

    def verify() -> torch.Tensor:
        return model.next_tokens(verify_tokens, lambda q: verify_attention(
            q, k, v, page_indptr, page_indices, kv_lens, GAMMA + 1, PAGE, D**-0.5), verify_scratch)

    budget = math.ceil(0.05 * ctx)
    selected = torch.randint(0, k.shape[0], (batch * budget,), device="cuda", dtype=torch.int32)
    sel_indptr = torch.arange(0, batch * budget + 1, budget, device="cuda", dtype=torch.int32)
    recent = torch.randint(0, k.shape[0], (batch, RECENT), device="cuda", dtype=torch.int32)
    counts = torch.full((batch,), RECENT, device="cuda", dtype=torch.int32)
    splits = draft_splits(batch, KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count)
    draft_tokens = torch.randint(0, VOCAB, (batch,), device="cuda")
    draft_scratch = scratch(batch)

    def drafts() -> torch.Tensor:
        tokens, chain = draft_tokens, []
        for _ in range(GAMMA):
            tokens = model.next_tokens(tokens, lambda q: sparse_draft_attention(
                q, k, v, selected, sel_indptr, recent, counts, D**-0.5, splits=splits), draft_scratch)
            chain.append(tokens)
        return torch.stack(chain, dim=1)

    return verify, drafts


def ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=300, return_mode="median"))


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    out: Any  # what the replays write fn's output to
    # the graph reads the tensors fn's closure holds (page tables, slots, scratch); dropping fn would free them for
    # reuse while replays still read them — most likely what made this probe's first runs hit illegal memory accesses
    fn: Callable[[], Any]


def captured(fn: Callable[[], Any]) -> Captured:
    """fn as a CUDA graph, with the tensor its replays write fn's output to and fn itself kept alive."""
    out = {}

    def keep():
        out["value"] = fn()

    graph = graph_of(keep)
    return Captured(graph, out["value"], fn)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    assert args.ctx % PAGE == 0 and args.batch % 2 == 0, "whole pages, two equal halves"
    torch.manual_seed(0)
    full, half = args.batch, args.batch // 2
    model = Model()
    k = rand(full * args.ctx, KV_HEADS, D)
    v = rand(full * args.ctx, KV_HEADS, D)
    verify_full, drafts_full = (captured(f) for f in sides(model, k, v, full, args.ctx))
    verify_fn, drafts_fn = sides(model, k, v, half, args.ctx)
    verify_half, drafts_half = captured(verify_fn), captured(drafts_fn)

    def sequential() -> None:
        verify_full.graph.replay()
        drafts_full.graph.replay()

    # each side alone first, printed as it comes: a fault in the overlapped graph would end the process
    t = {
        "verify_full": ms(verify_full.graph.replay), "drafts_full": ms(drafts_full.graph.replay),
        "verify_half": ms(verify_half.graph.replay), "drafts_half": ms(drafts_half.graph.replay),
        "sequential": ms(sequential),
    }
    print(f"ctx {args.ctx}, batch {full} (halves of {half}), ms")
    print("| | verify | drafts (γ = 4) | both |")
    print("|---|---:|---:|---:|")
    print(f"| batch {full}, one after the other (the engine's step) | {t['verify_full']:.2f} | {t['drafts_full']:.2f} "
          f"| {t['sequential']:.2f} |")
    print(f"| batch {half}, alone | {t['verify_half']:.2f} | {t['drafts_half']:.2f} "
          f"| {t['verify_half'] + t['drafts_half']:.2f} (sum) |", flush=True)

    verify_stream, drafts_stream = torch.cuda.Stream(), torch.cuda.Stream()
    # pooled streams: two that coincided (or matched the capture stream) would run the branches one after the other
    capture = torch.cuda.graph.default_capture_stream  # set by the captures above
    assert len({verify_stream.cuda_stream, drafts_stream.cuda_stream, capture.cuda_stream}) == 3, "distinct streams"

    def side_by_side() -> tuple[torch.Tensor, torch.Tensor]:
        # forked from the capturing stream and joined back: the graph holds the two chains as parallel branches
        current = torch.cuda.current_stream()
        verify_stream.wait_stream(current)
        drafts_stream.wait_stream(current)
        with torch.cuda.stream(verify_stream):
            verified = verify_fn()
        with torch.cuda.stream(drafts_stream):
            drafted = drafts_fn()
        current.wait_stream(verify_stream)
        current.wait_stream(drafts_stream)
        return verified, drafted

    both = captured(side_by_side)
    # the branches must leave each side's outputs as a run of it alone does
    verify_half.graph.replay()
    drafts_half.graph.replay()
    torch.cuda.synchronize()
    expected = [verify_half.out.clone(), drafts_half.out.clone()]
    both.graph.replay()
    torch.cuda.synchronize()
    ok = torch.equal(both.out[0], expected[0]) and torch.equal(both.out[1], expected[1])
    if not ok:
        print("CHECK FAILED: the overlapped graph's outputs differ from each side's alone", file=sys.stderr)
    overlapped = ms(both.graph.replay)
    print(f"| batch {half}, overlapped (one graph, two branches) | | | {overlapped:.2f} (a pipelined step: "
          f"{2 * overlapped:.2f}, {t['sequential'] / (2 * overlapped):.2f}× the engine's) |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
