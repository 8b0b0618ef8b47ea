#!/usr/bin/env python3
"""Probe: does our Triton verification kernel with the scores taken in its pass beat FlashInfer + the score kernel?

One layer of the default model (9 query heads, 3 KV heads, head_dim 64, bf16, page size 16, shuffled pages),
5 verification rows per request (γ = 4) scored on rows (0, 4), a few requests of odd lengths. Per shape:
  check  `kernels.verify_attention.verify_attention` against FlashInfer's tensor-core decode planned with
         q_len_per_req = 5 (output), and its kept weights (through `gather_slot_scores`) against
         `verification_scores_paged` on FlashInfer's LSE (scores); the same at q_len 1 (a plain decode)
  time   (triton do_bench median, µs per layer) FlashInfer verify; FlashInfer verify + score kernel; ours without
         scores; ours with scores + gather; FlashInfer decode and ours at q_len 1; each as % of copy bandwidth
The first shape sweeps our kernel's launch parameters (BLOCK_N × warps × stages) and the rest use the best
(--no-sweep: its defaults everywhere).
Usage (GPU machine, repo importable as `specattn`): python3 scripts/verify_kernel_probe.py [--shapes 128x8192 ...] [--no-sweep]
Prints a table; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import torch
from triton.testing import do_bench

from specattn.kernels.scores import gather_slot_scores, verification_scores_paged
from specattn.kernels.verify_attention import SlotScores, verify_attention

HEADS, KV_HEADS, D, PAGE, Q_LEN = 9, 3, 64, 16, 5
SCALE = D**-0.5
DTYPE = torch.bfloat16


def bench_us(fn) -> float:
    return 1000 * float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth() -> float:
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_us(lambda: dst.copy_(src)) * 1e-6)


class Shape:
    def __init__(self, batch: int, ctx: int, q_len: int):
        g = torch.Generator().manual_seed(batch * 7 + ctx + q_len)
        self.batch, self.q_len = batch, q_len
        self.kv_lens = [ctx + q_len - (37 * i % 300 if i % 5 == 1 else 0) for i in range(batch)]
        pages = [-(-n // PAGE) for n in self.kv_lens]
        perm = torch.randperm(sum(pages) + 1, generator=g)[: sum(pages)]
        self.num_slots = (sum(pages) + 1) * PAGE
        dev = "cuda"
        self.k = torch.randn(self.num_slots, KV_HEADS, D, device=dev, dtype=DTYPE)
        self.v = torch.randn(self.num_slots, KV_HEADS, D, device=dev, dtype=DTYPE)
        self.q = torch.randn(batch * q_len, HEADS, D, device=dev, dtype=DTYPE)
        i32 = dict(dtype=torch.int32, device=dev)
        self.indptr = torch.tensor([0, *itertools.accumulate(pages)], **i32)
        self.indices = perm.to(**i32)
        self.last_len = torch.tensor([n - (p - 1) * PAGE for n, p in zip(self.kv_lens, pages)], dtype=torch.int32)
        self.kv = torch.tensor(self.kv_lens, **i32)
        self.rows = torch.tensor([[0, q_len - 1]] * batch, **i32)
        self.score_lens_list = [n - q_len + 1 for n in self.kv_lens]
        self.score_lens = torch.tensor(self.score_lens_list, **i32)
        self.bytes = sum(self.kv_lens) * KV_HEADS * D * 2 * DTYPE.itemsize

    def slot_scores(self, scratch_dtype: torch.dtype = torch.float32) -> SlotScores:
        return SlotScores(self.rows, self.score_lens,
                          torch.empty(KV_HEADS, 2 * HEADS // KV_HEADS, self.num_slots, device="cuda", dtype=scratch_dtype),
                          torch.empty(len(self.kv_lens), KV_HEADS, 2 * HEADS // KV_HEADS, device="cuda"),
                          torch.empty(1, KV_HEADS, self.num_slots, device="cuda"))


def main() -> int:
    import flashinfer

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["128x8192", "256x8192", "128x4096", "64x8192"])
    ap.add_argument("--no-sweep", action="store_true", help="time our kernel at its default launch parameters only")
    args = ap.parse_args()
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    ok = True
    best: dict[str, dict] = {}
    rows_out = []
    for n, spec in enumerate(args.shapes):
        batch, ctx = map(int, spec.split("x"))
        for q_len in (Q_LEN, 1):
            s = Shape(batch, ctx, q_len)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True, backend="fa2")
            w.plan(s.indptr.cpu(), s.indices, s.last_len, HEADS, KV_HEADS, D, PAGE, q_len_per_req=q_len,
                   sm_scale=SCALE, q_data_type=DTYPE, kv_data_type=DTYPE)
            paged = (s.k.view(-1, PAGE, KV_HEADS, D), s.v.view(-1, PAGE, KV_HEADS, D))
            fi_out, lse2 = w.run(s.q, paged, return_lse=True)
            scoring = q_len > 1
            sc = s.slot_scores() if scoring else None
            ours = verify_attention(s.q, s.k, s.v, s.indptr, s.indices, s.kv, q_len, PAGE, SCALE,
                                    scores=dataclasses.replace(sc, out=sc.out[0]) if sc else None)
            err = ((ours.float() - fi_out.float()).abs().max() / fi_out.float().abs().max()).item()
            good = err < 2e-2
            line = f"{spec} q_len={q_len}: output vs FlashInfer max rel err {err:.2e}"
            if scoring:
                rows_flat = (torch.arange(batch, device="cuda")[:, None] * q_len + s.rows.long()).reshape(-1)
                q_rows = s.q[rows_flat].view(1, batch, 2, HEADS, D)
                lse_rows = lse2[rows_flat].view(1, batch, 2, HEADS)
                row_pos = (s.kv[:, None] - q_len + s.rows).to(torch.int32)
                width = max(s.score_lens_list)
                ref = torch.empty(1, batch, width, device="cuda")
                score_args = (row_pos, s.indptr[:-1].contiguous(), s.indices, s.score_lens)
                verification_scores_paged(q_rows, lse_rows, s.k[None], *score_args, page_size=PAGE, scale=SCALE, out=ref)
                got = torch.empty_like(ref)
                gather_slot_scores(sc.out, s.indptr[:-1].contiguous(), s.indices, s.score_lens, PAGE, HEADS, got)
                serr = (got - ref).abs().max().item()
                good = good and serr < 2e-4
                line += f"; scores vs score kernel max abs err {serr:.2e}"
                # the same with the logits kept in float16 (half the bytes stored and read back)
                sc16 = s.slot_scores(torch.float16)
                verify_attention(s.q, s.k, s.v, s.indptr, s.indices, s.kv, q_len, PAGE, SCALE,
                                 scores=dataclasses.replace(sc16, out=sc16.out[0]))
                gather_slot_scores(sc16.out, s.indptr[:-1].contiguous(), s.indices, s.score_lens, PAGE, HEADS, got)
                serr16 = (got - ref).abs().max().item()
                good = good and serr16 < 2e-3
                line += f", float16 scratch {serr16:.2e}"
            ok = ok and good
            print(("PASS " if good else "FAIL ") + line, flush=True)

            t_fi = bench_us(lambda: w.run(s.q, paged))
            timings = {"flashinfer": t_fi}
            if scoring:
                t_sc = bench_us(lambda: verification_scores_paged(q_rows, lse_rows, s.k[None], *score_args,
                                                                  page_size=PAGE, scale=SCALE, out=ref))
                t_ga = bench_us(lambda: gather_slot_scores(sc.out, s.indptr[:-1].contiguous(), s.indices, s.score_lens,
                                                           PAGE, HEADS, got))
                timings["score kernel"] = t_sc
                timings["gather"] = t_ga

            def ours_us(cfg: dict, with_scores: bool) -> float:
                kw = dict(scores=dataclasses.replace(sc, out=sc.out[0])) if with_scores else {}
                return bench_us(lambda: verify_attention(s.q, s.k, s.v, s.indptr, s.indices, s.kv, q_len, PAGE, SCALE,
                                                         **kw, **cfg))

            variants = [("ours", False)] + ([("ours+scores", True)] if scoring else [])
            for name, with_scores in variants:
                key = f"{name} q{q_len}"
                if args.no_sweep:
                    best[key] = {}
                elif n == 0:
                    sweep = {}
                    for bn, nw, st in itertools.product((64, 128), (2, 4, 8), (2, 3)):
                        cfg = dict(block_n=bn, num_warps=nw, num_stages=st)
                        try:
                            sweep[(bn, nw, st)] = ours_us(cfg, with_scores)
                        except Exception as exc:  # an over-budget config (shared memory)
                            print(f"  {key} {cfg}: {type(exc).__name__}", flush=True)
                    top = sorted(sweep.items(), key=lambda kv: kv[1])[:5]
                    print(f"  {key} sweep at {spec}, best five: " +
                          ", ".join(f"{c}: {t:.1f}" for c, t in top), flush=True)
                    bn, nw, st = top[0][0]
                    best[key] = dict(block_n=bn, num_warps=nw, num_stages=st)
                    timings[f"{name} default"] = sweep.get((64, 4, 2), float("nan"))
                if with_scores and n == 0:
                    wsweep = {(wb, wc): ours_us({**best[key], "weight_block": wb, "weight_chunks": wc}, True)
                              for wb, wc in itertools.product((256, 512, 1024), (4, 8, 16))}
                    print(f"  {key} (weight_block, weight_chunks) sweep: "
                          + ", ".join(f"{c}: {t:.1f}" for c, t in sorted(wsweep.items(), key=lambda kv: kv[1])), flush=True)
                timings[name] = ours_us(best[key], with_scores)
            if scoring:
                timings["ours+scores, float16 scratch"] = bench_us(lambda: verify_attention(
                    s.q, s.k, s.v, s.indptr, s.indices, s.kv, q_len, PAGE, SCALE,
                    scores=dataclasses.replace(sc16, out=sc16.out[0]), **best.get(f"ours+scores q{q_len}", {})))
                # the scoring math without its stores and second pass: every sequence unscored
                unscored = dataclasses.replace(sc, lengths=torch.zeros_like(sc.lengths), out=sc.out[0])
                timings["ours+scores, none scored"] = bench_us(lambda: verify_attention(
                    s.q, s.k, s.v, s.indptr, s.indices, s.kv, q_len, PAGE, SCALE, scores=unscored,
                    **best.get(f"ours+scores q{q_len}", {})))
            for name, t in timings.items():
                pct = "" if name in ("score kernel", "gather") else f"{100 * s.bytes / (t * 1e-6) / copy_bw:.0f}%"
                rows_out.append((spec, q_len, name, t, pct))
            if scoring:
                fused = timings["ours+scores"] + timings["gather"]
                rows_out.append((spec, q_len, "=> ours+scores+gather vs flashinfer+score kernel",
                                 fused, f"{(t_fi + t_sc) / fused:.2f}x"))
    print("\nbest configs:", best)
    print(f"\n| shape | q_len | variant | µs/layer | % copy BW (or ratio) |\n|---|---|---|---|---|")
    for spec, q_len, name, t, pct in rows_out:
        print(f"| {spec} | {q_len} | {name} | {t:.1f} | {pct} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
