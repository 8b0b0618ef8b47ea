#!/usr/bin/env python3
"""Probe: does a draft chain run beside a verification? Two half-batches, one verifying while the other drafts.

A SpecAttn step at 8k × 128 runs its four draft forwards (latency-bound: ≈ 270 small kernels each, few SMs busy)
and then its verification (bandwidth-bound: the full K/V read), one after the other. If the batch's two halves took
turns — half A's verification on one stream while half B drafts on another — the drafts' latency could hide under
the verification's memory traffic. This probe measures whether the GPU overlaps the two, with the default model's
shapes and random weights in the engine's own decoder (engine/model.py), each side captured as a CUDA graph:
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
from triton.testing import do_bench

from scripts.gpu_kernel_bench import graph_of
from specattn.engine.config import ModelConfig
from specattn.engine.kv_cache import KVWrite
from specattn.engine.model import DecoderModel
from specattn.kernels.draft_attention import draft_splits, sparse_draft_attention
from specattn.kernels.verify_attention import verify_attention

HIDDEN, HEADS, KV_HEADS, D, INTER, LAYERS, VOCAB, EPS = 576, 9, 3, 64, 1536, 30, 49152, 1e-5
GAMMA, PAGE, RECENT = 4, 16, 8
DTYPE = torch.bfloat16


def rand(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape) * scale + offset


def default_shaped_model(max_context: int) -> DecoderModel:
    """The engine's decoder (fused layer kernels on CUDA) in the default model's shapes, with random weights."""
    config = ModelConfig("llama", VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, D, 1e5, EPS, max_context,
                         tie_word_embeddings=True)
    weights = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN, scale=0.1, offset=1)}
    for i in range(LAYERS):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        weights.update({
            p + "input_layernorm.weight": rand(HIDDEN, scale=0.1, offset=1),
            p + "post_attention_layernorm.weight": rand(HIDDEN, scale=0.1, offset=1),
            a + "q_proj.weight": rand(HEADS * D, HIDDEN, scale=HIDDEN**-0.5),
            a + "k_proj.weight": rand(KV_HEADS * D, HIDDEN, scale=HIDDEN**-0.5),
            a + "v_proj.weight": rand(KV_HEADS * D, HIDDEN, scale=HIDDEN**-0.5),
            a + "o_proj.weight": rand(HIDDEN, HEADS * D, scale=HIDDEN**-0.5),
            p + "mlp.gate_proj.weight": rand(INTER, HIDDEN, scale=HIDDEN**-0.5),
            p + "mlp.up_proj.weight": rand(INTER, HIDDEN, scale=HIDDEN**-0.5),
            p + "mlp.down_proj.weight": rand(HIDDEN, INTER, scale=INTER**-0.5),
        })
    return DecoderModel(config, weights, DTYPE, "cuda")


@dataclass
class ProbeAttention:
    """The model's attention for one side: the new rows' K/V go to a scratch cache (the cache read stays as made),
    attention is the side's kernel over the shared cache."""

    attend: Callable[[torch.Tensor], torch.Tensor]
    scratch: KVWrite

    def kv_write(self, layer: int) -> KVWrite:
        return self.scratch

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.attend(q)


def scratch(rows: int) -> KVWrite:
    k_new = torch.empty(rows, KV_HEADS, D, device="cuda", dtype=DTYPE)
    return KVWrite(k_new, torch.empty_like(k_new), torch.arange(rows, device="cuda"))


def next_tokens(model: DecoderModel, tokens: torch.Tensor, positions: torch.Tensor, attention: ProbeAttention):
    return model.logits(model.forward(tokens, positions, attention)).argmax(dim=-1)


def sides(model: DecoderModel, k: torch.Tensor, v: torch.Tensor, batch: int, ctx: int):
    """verify() and drafts() for batch sequences whose pages are scattered over the cache, each returning its tokens."""
    pages_per_seq = ctx // PAGE
    page_indices = (torch.randperm(k.shape[0] // PAGE, device="cuda")[: batch * pages_per_seq]).to(torch.int32)
    page_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * pages_per_seq
    kv_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    verify_tokens = torch.randint(0, VOCAB, (batch * (GAMMA + 1),), device="cuda")
    verify_positions = torch.arange(ctx - GAMMA - 1, ctx, device="cuda").repeat(batch)
    verify_attention_ = ProbeAttention(lambda q: verify_attention(
        q, k, v, page_indptr, page_indices, kv_lens, GAMMA + 1, PAGE, D**-0.5), scratch(batch * (GAMMA + 1)))

    def verify() -> torch.Tensor:
        return next_tokens(model, verify_tokens, verify_positions, verify_attention_)

    budget = math.ceil(0.05 * ctx)
    selected = torch.randint(0, k.shape[0], (batch * budget,), device="cuda", dtype=torch.int32)
    sel_indptr = torch.arange(0, batch * budget + 1, budget, device="cuda", dtype=torch.int32)
    recent = torch.randint(0, k.shape[0], (batch, RECENT), device="cuda", dtype=torch.int32)
    counts = torch.full((batch,), RECENT, device="cuda", dtype=torch.int32)
    splits = draft_splits(batch, KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count)
    draft_tokens = torch.randint(0, VOCAB, (batch,), device="cuda")
    draft_positions = [torch.full((batch,), ctx + i, device="cuda") for i in range(GAMMA)]
    draft_attention = ProbeAttention(lambda q: sparse_draft_attention(
        q, k, v, selected, sel_indptr, recent, counts, D**-0.5, splits=splits), scratch(batch))

    def drafts() -> torch.Tensor:
        tokens, chain = draft_tokens, []
        for positions in draft_positions:
            tokens = next_tokens(model, tokens, positions, draft_attention)
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
    model = default_shaped_model(args.ctx + GAMMA)
    k = torch.randn(full * args.ctx, KV_HEADS, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
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
