"""Kernel micro-benchmark on CUDA: each attention / scoring kernel is checked against plain torch, then timed.

The model shape is fixed (the default model): 9 query heads, 3 KV heads, head_dim 64, 30 layers, bf16, page size 16,
one layer's K and V cache each [slots, 3, 64] (NHD). Variants, each at every context × batch that fits:
  copy     device-to-device copy of ~4 GiB: the bandwidth ceiling every other row is a percentage of
  decode   FlashInfer paged decode, one query per sequence, CUDA cores and tensor cores
  verify   FlashInfer paged prefill (fa2), 5 causal rows per sequence with base-2 LSE; and tensor-core decode
           planned with q_len_per_req=5
  draft    paged decode over the page-size-1 view of the same cache, ceil(0.05·ctx) chosen + 4 recent slots; and
           the 30-layer pattern of that design: plan once on an indices buffer, refill it per layer, run; and the
           engine's Triton draft kernel (no plan) over the same slots
  scores   the Triton verification-score kernel on verify's own q and LSE, 30 launches (one per layer)
  topk     the engine's critical-token selection (kernels/radix_select.py) over [30, B, ctx] scores, checked
           against top-k + sort per sequence
  plan     host time of plan() for decode, verify and draft
  layer    the decoder layer's fused Triton kernels (kernels/fused_layer.py: add+RMSNorm, RoPE with the K/V cache
           write, SiLU·up) against the
           torch ops they replace, at 128 and 640 tokens (a decode batch; a verify batch of 128 × 5 rows), hidden 576,
           intermediate 1536: each op, and 30 layers' elementwise work, replayed from a CUDA graph. Its rows
           are keyed ctx=0 (the work does not depend on the context) and B = tokens; a table of its own.

Usage (GPU machine, with the repo importable as `specattn`, as scripts/gpu_bench.sh arranges):
    python scripts/gpu_kernel_bench.py --out $OUT [--contexts 4096 8192] [--batches 64 128 256] [--quick]
                                         [--layer-tokens 128 640] [--layer-only]
--layer-only runs copy and layer alone, so it needs no FlashInfer.
Writes $OUT/kernel_bench.md and $OUT/kernel_bench.json, prints the table last, exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import triton
from triton.testing import do_bench

from specattn.engine.model import add_rms_norm, rms_norm, rope_write_kv, silu_mul
from specattn.kernels import fused_layer
from specattn.kernels.draft_attention import sparse_draft_attention
from specattn.kernels.reference import select_critical_tokens, verification_scores
from specattn.kernels.scores import verification_scores_paged
from specattn.kernels.selection import select_critical_tokens_batched

HEADS, KV_HEADS, HEAD_DIM, LAYERS, PAGE = 9, 3, 64, 30, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
GAMMA = 4
VERIFY_ROWS = GAMMA + 1
RECENT = 4  # recent slots every draft keeps besides the selected ones
DRAFT_RATIO = 0.05
SLOT_BYTES = KV_HEADS * HEAD_DIM * DTYPE.itemsize  # one token's K (or V) in one layer
KV_BUDGET_BYTES = 100e9  # a context × batch whose 30-layer K+V exceeds this is not a configuration the engine runs
COPY_BYTES = 4 << 30
WORKSPACE_BYTES = 256 << 20
ATTN_REL_TOL = 2e-2  # bf16 outputs
LSE_ABS_TOL = 1e-2  # base-2 LSE is ~log2(ctx); a natural-log LSE would be off by ~5
SCORE_ATOL = 1e-4
SCORE_REL_TOL = 1e-3  # fp32 scores from bf16 inputs: atol alone is loose next to weights of ~1/ctx
REF_CHUNK_ELEMS = 1 << 26  # fp32 elements of gathered K per reference chunk (256 MB), bounding reference memory
BENCH_WARMUP_MS, BENCH_REP_MS = 25, 100
PLAN_REPS = 5
# plan() metadata (indptr, last_page_len) lives on the host and page indices on the device, as
# engine/flashinfer_attention.py passes them, so the plan() host times are the engine's.
HOST = torch.device("cpu")
# the layer variant: the default model's hidden and MLP sizes (HEADS, KV_HEADS, HEAD_DIM as above)
HIDDEN, INTERMEDIATE, RMS_EPS = 576, 1536, 1e-5
LAYER_REL_TOL = 1e-2  # bf16 outputs of the same math in the same roundings: reduction order differs, ~1 ulp at most

# triton.testing.do_bench has had return_mode since 3.0; fall back to the median quantile on an older one.
_HAS_RETURN_MODE = "return_mode" in inspect.signature(do_bench).parameters
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median device time of fn in ms (do_bench flushes L2 between runs, so caches never serve a repeat read)."""
    if _HAS_RETURN_MODE:
        return float(do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))
    return float(do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, quantiles=[0.5])[0])


def host_ms(fn: Callable[[], Any]) -> float:
    """Median wall time of fn in ms, the GPU idle before and drained after: plan() is host work plus small copies."""
    times = []
    for _ in range(PLAN_REPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Report:
    """Every check and timing of the run; the table and the JSON are rendered from it."""

    meta: dict[str, Any]
    copy_gbps: float = float("nan")
    checks: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)

    def check(self, case: Case | None, variant: str, ok: bool, detail: str, status: str | None = None) -> bool:
        status = status or ("PASS" if ok else "FAIL")
        where = f"ctx={case.ctx} B={case.batch} " if case else ""
        print(f"{status} {where}{variant}: {detail}", flush=True)
        self.checks.append({**_key(case), "variant": variant, "status": status, "detail": detail})
        return ok

    def skip(self, case: Case, variant: str, detail: str) -> None:
        self.check(case, variant, False, detail, status="SKIP")

    def timing(self, case: Case, variant: str, ms: float, nbytes: float | None = None, host: bool = False) -> None:
        rec: dict[str, Any] = {**_key(case), "variant": variant, "ms": ms, "host_time": host}
        if nbytes is not None:
            rec["bytes"] = nbytes
            rec["gbps"] = nbytes / ms / 1e6
            rec["pct_copy"] = 100 * rec["gbps"] / self.copy_gbps
        self.timings.append(rec)
        extra = f"  {rec['gbps']:.0f} GB/s = {rec['pct_copy']:.0f}% of copy" if nbytes is not None else ""
        log(f"  time ctx={case.ctx} B={case.batch} {variant}: {ms * 1e3:.1f} us{extra}")

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["status"] == "FAIL"]

    def find(self, ctx: int, batch: int, variant: str) -> dict[str, Any] | None:
        return next((t for t in self.timings if (t["ctx"], t["batch"], t["variant"]) == (ctx, batch, variant)), None)

    def status(self, ctx: int, batch: int, variant: str) -> str:
        """FAIL / n/a (skipped) / - for a variant without a timing, so the table says why a cell is empty.

        A check named by a prefix of the variant counts too: run_guarded names a raise by its group ("decode").
        """
        states = {c["status"] for c in self.checks
                  if (c.get("ctx"), c.get("batch")) == (ctx, batch) and variant.startswith(c["variant"])}
        return "FAIL" if "FAIL" in states else "n/a" if "SKIP" in states else "-"


def _key(case: Case | None) -> dict[str, int]:
    return {"ctx": case.ctx, "batch": case.batch} if case else {}


def run_guarded(report: Report, case: Case, variant: str, fn: Callable[[], Any]) -> Any:
    """Run one variant; an exception fails that variant only (a sticky CUDA error will fail the rest anyway)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any error is this variant's failure, reported and counted
        traceback.print_exc()
        report.check(case, variant, False, f"raised {type(exc).__name__}: {exc}")
        return None


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass
class Case:
    """One context × batch: a one-layer K/V pool whose pages are a random permutation, and its paged metadata."""

    ctx: int
    batch: int
    k: torch.Tensor  # [slots, KV_HEADS, HEAD_DIM]
    v: torch.Tensor
    pages: torch.Tensor  # [batch, ctx // PAGE] int32: each sequence's pages in position order

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def paged_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.view(-1, PAGE, KV_HEADS, HEAD_DIM), self.v.view(-1, PAGE, KV_HEADS, HEAD_DIM)

    @property
    def sparse_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same memory as pages of one slot: what the draft addresses slot by slot."""
        return self.k.view(-1, 1, KV_HEADS, HEAD_DIM), self.v.view(-1, 1, KV_HEADS, HEAD_DIM)

    @property
    def kv_indptr(self) -> torch.Tensor:
        return _indptr(self.batch, self.pages.shape[1], HOST)

    @property
    def kv_indices(self) -> torch.Tensor:
        return self.pages.flatten()

    @property
    def last_page_len(self) -> torch.Tensor:
        return torch.full((self.batch,), PAGE, dtype=torch.int32, device=HOST)

    @property
    def kv_bytes(self) -> float:
        """K and V of every sequence's whole context: what one decode or verify must read."""
        return 2.0 * self.batch * self.ctx * SLOT_BYTES

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each position; positions [..., B, N] → [..., B, N] int64."""
        table = self.pages.long().expand(*positions.shape[:-1], self.pages.shape[1])
        return table.gather(-1, positions // PAGE) * PAGE + positions % PAGE

    def all_slots(self) -> torch.Tensor:
        positions = torch.arange(self.ctx, device=self.device).expand(self.batch, self.ctx)
        return self.slots(positions)


def make_case(ctx: int, batch: int, device: torch.device) -> Case:
    pages_per_seq = ctx // PAGE
    num_slots = batch * ctx
    pages = torch.randperm(batch * pages_per_seq, device=device).to(torch.int32).view(batch, pages_per_seq)
    k = torch.randn(num_slots, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn(num_slots, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    return Case(ctx, batch, k, v, pages)


def _indptr(batch: int, per_seq: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * per_seq


def verify_mask(ctx: int, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[len(rows), ctx]: verification row r (0..4) sits at position ctx-5+r and attends positions up to it."""
    limits = ctx - VERIFY_ROWS + rows.to(device)
    return torch.arange(ctx, device=device)[None, :] <= limits[:, None]


def draft_slots(case: Case, k: int, layers: int) -> torch.Tensor:
    """[layers, B, k + RECENT] slots: per layer and sequence k distinct older positions (sorted) and the recent ones."""
    older = case.ctx - RECENT
    chosen = torch.rand(layers, case.batch, older, device=case.device).topk(k, dim=-1).indices.sort(dim=-1).values
    recent = torch.arange(older, case.ctx, device=case.device).expand(layers, case.batch, RECENT)
    return case.slots(torch.cat([chosen, recent], dim=-1))


# ---------------------------------------------------------------------------------------------------- references


def _chunks(batch: int, n_keys: int) -> list[slice]:
    step = max(1, REF_CHUNK_ELEMS // (n_keys * KV_HEADS * HEAD_DIM))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def reference_attention(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention of q [B, R, H, d] over the keys at slots [B, N]; mask [R, N] (True = attend) or None.

    Returns out [B, R, H, d] and the base-2 LSE [B, R, H] (FlashInfer's convention).
    """
    b, r, h, d = q.shape
    out = torch.empty(b, r, h, d, dtype=torch.float32, device=q.device)
    lse2 = torch.empty(b, r, h, dtype=torch.float32, device=q.device)
    for s in _chunks(b, slots.shape[1]):
        ks, vs = k[slots[s]].float(), v[slots[s]].float()  # [c, N, Hkv, d]
        # query heads grouped by the KV head they share, so K/V are never expanded
        qg = q[s].float().reshape(-1, r, KV_HEADS, h // KV_HEADS, d)
        logits = torch.einsum("brkgd,bnkd->brkgn", qg, ks) * SCALE
        if mask is not None:
            logits = logits.masked_fill(~mask[None, :, None, None, :], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        o = torch.einsum("brkgn,bnkd->brkgd", torch.exp(logits - lse), vs)
        out[s] = o.reshape(-1, r, h, d)
        lse2[s] = lse.reshape(-1, r, h) / math.log(2)
    return out, lse2


def reference_scores(case: Case, q_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, ctx] mean weights of the scored rows q_rows [B, 2, H, d] (verification rows `rows`), fp32."""
    slots = case.all_slots()
    mask = verify_mask(case.ctx, rows, case.device)
    out = torch.empty(case.batch, case.ctx, dtype=torch.float32, device=case.device)
    for s in _chunks(case.batch, case.ctx):
        n = s.stop - s.start
        out[s] = verification_scores(q_rows[s].float(), case.k[slots[s]].float(), mask.expand(n, -1, -1), SCALE)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_attention(report: Report, case: Case, variant: str, out: torch.Tensor, ref: torch.Tensor) -> bool:
    finite = bool(torch.isfinite(out).all())
    err = rel_err(out, ref) if finite else float("nan")
    return report.check(case, variant, finite and err < ATTN_REL_TOL, f"finite={finite} rel_err={err:.2e}")


def check_lse(report: Report, case: Case, variant: str, lse: torch.Tensor, ref_lse2: torch.Tensor) -> bool:
    finite = bool(torch.isfinite(lse).all())
    err = (lse - ref_lse2).abs().max().item() if finite else float("nan")
    detail = f"base-2 LSE finite={finite} max_abs_err={err:.2e}"
    return report.check(case, variant, finite and err < LSE_ABS_TOL, detail)


# ---------------------------------------------------------------------------------------------------- variants


@dataclass
class Wrappers:
    """Built once and re-planned per case, so each FlashInfer kernel JIT-compiles once."""

    decode_cc: Any
    decode_tc: Any
    verify: Any
    verify_tc: Any  # tensor-core decode planned with q_len_per_req = VERIFY_ROWS
    draft: Any

    @staticmethod
    def build(fi: Any, device: torch.device) -> Wrappers:
        def workspace() -> torch.Tensor:
            return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)  # must be zero at first use

        # backend="fa2" pinned: on SM90 "auto" also lands there, and a pinned choice keeps rows comparable.
        def decode(tensor_cores: bool) -> Any:
            return fi.BatchDecodeWithPagedKVCacheWrapper(
                workspace(), "NHD", use_tensor_cores=tensor_cores, backend="fa2")

        return Wrappers(
            decode_cc=decode(False),
            decode_tc=decode(True),
            verify=fi.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend="fa2"),
            verify_tc=decode(True),
            draft=decode(False),
        )


def plan_decode(wrapper: Any, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor,
                page_size: int, q_len_per_req: int = 1) -> None:
    wrapper.plan(indptr, indices, last_page_len, HEADS, KV_HEADS, HEAD_DIM, page_size,
                 q_data_type=DTYPE, kv_data_type=DTYPE, sm_scale=SCALE, q_len_per_req=q_len_per_req)


def measure_copy(report: Report, device: torch.device) -> None:
    src = torch.randn(COPY_BYTES // DTYPE.itemsize, dtype=DTYPE, device=device)
    dst = torch.full_like(src, float("nan"))
    dst.copy_(src)
    report.check(None, "copy", torch.equal(dst, src), f"{COPY_BYTES >> 30} GiB bf16 copied exactly")
    ms = bench_ms(partial(dst.copy_, src))
    report.copy_gbps = 2 * COPY_BYTES / ms / 1e6  # read + write
    log(f"copy: {ms:.3f} ms, {report.copy_gbps:.0f} GB/s (read + write)")


def bench_decode(report: Report, w: Wrappers, case: Case) -> None:
    q = torch.randn(case.batch, HEADS, HEAD_DIM, device=case.device, dtype=DTYPE)
    ref, _ = reference_attention(case.k, case.v, case.all_slots(), q[:, None], None)
    for variant, wrapper in (("decode_cc", w.decode_cc), ("decode_tc", w.decode_tc)):
        log(f"  {variant}: plan + first run (JIT-compiles the kernel on first use)")
        plan_decode(wrapper, case.kv_indptr, case.kv_indices, case.last_page_len, PAGE)
        out = torch.full_like(q, float("nan"))
        run = partial(wrapper.run, q, case.paged_kv, out=out)
        run()
        if check_attention(report, case, variant, out, ref[:, 0]):
            report.timing(case, variant, bench_ms(run), case.kv_bytes)
    plan = partial(plan_decode, w.decode_cc, case.kv_indptr, case.kv_indices, case.last_page_len, PAGE)
    report.timing(case, "plan_decode", host_ms(plan), host=True)


def bench_verify(report: Report, w: Wrappers, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify attention; returns its q [B*5, H, d] and the LSE [B*5, H] it returned, checked or not.

    The scores check consumes that LSE whatever verify's own checks said, so it tests the base-2 convention on its own.
    """
    b = case.batch
    q = torch.randn(b * VERIFY_ROWS, HEADS, HEAD_DIM, device=case.device, dtype=DTYPE)
    mask = verify_mask(case.ctx, torch.arange(VERIFY_ROWS), case.device)
    ref, ref_lse2 = reference_attention(case.k, case.v, case.all_slots(), q.view(b, VERIFY_ROWS, HEADS, HEAD_DIM), mask)
    ref, ref_lse2 = ref.flatten(0, 1), ref_lse2.flatten(0, 1)
    qo_indptr = _indptr(b, VERIFY_ROWS, HOST)

    def plan() -> None:
        w.verify.plan(qo_indptr, case.kv_indptr, case.kv_indices, case.last_page_len, HEADS, KV_HEADS, HEAD_DIM, PAGE,
                      causal=True, sm_scale=SCALE, q_data_type=DTYPE, kv_data_type=DTYPE)

    log("  verify_fa2: plan + first run (JIT-compiles the kernel on first use)")
    plan()
    out, lse = torch.full_like(q, float("nan")), torch.full((q.shape[0], HEADS), float("nan"), device=case.device)
    run = partial(w.verify.run, q, case.paged_kv, out=out, lse=lse, return_lse=True, lse_base="log2")
    out_v, lse_v = run()
    ok = check_attention(report, case, "verify_fa2", out_v, ref)
    ok &= check_lse(report, case, "verify_fa2", lse_v, ref_lse2)
    if ok:
        report.timing(case, "verify_fa2", bench_ms(run), case.kv_bytes)
    report.timing(case, "plan_verify", host_ms(plan), host=True)
    bench_verify_tc(report, w, case, q, ref, ref_lse2)
    return q, lse_v


def bench_verify_tc(report: Report, w: Wrappers, case: Case, q: torch.Tensor, ref: torch.Tensor,
                    ref_lse2: torch.Tensor) -> None:
    """The same verification through tensor-core decode planned with q_len_per_req=5: optional, so SKIP if refused."""
    variant = "verify_tc_decode"
    out, lse = torch.full_like(q, float("nan")), torch.full((q.shape[0], HEADS), float("nan"), device=case.device)
    run = partial(w.verify_tc.run, q, case.paged_kv, out=out, lse=lse, return_lse=True)
    try:
        plan_decode(w.verify_tc, case.kv_indptr, case.kv_indices, case.last_page_len, PAGE, q_len_per_req=VERIFY_ROWS)
        out_v, lse_v = run()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - "if it works": a refusal is reported, not failed
        report.skip(case, variant, f"q_len_per_req={VERIFY_ROWS} refused: {type(exc).__name__}: {exc}")
        return
    ok = check_attention(report, case, variant, out_v, ref)
    ok &= check_lse(report, case, variant, lse_v, ref_lse2)
    if ok:
        report.timing(case, variant, bench_ms(run), case.kv_bytes)


def scores_launcher(case: Case, q: torch.Tensor, lse2: torch.Tensor, out: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One layer's score launch: rows = the first and last verification row of each sequence, span [0, ctx-4)."""
    b, dev = case.batch, case.device
    scored = torch.tensor([0, GAMMA], device=dev)
    q_rows = q.view(b, VERIFY_ROWS, HEADS, HEAD_DIM)[:, scored][None].contiguous()  # [1 layer, B, 2, H, d]
    lse_rows = lse2.view(b, VERIFY_ROWS, HEADS)[:, scored][None].contiguous()
    row_pos = torch.tensor([case.ctx - VERIFY_ROWS, case.ctx - 1], dtype=torch.int32, device=dev).repeat(b, 1)
    page_start = _indptr(b, case.pages.shape[1], dev)[:-1]
    lengths = torch.full((b,), case.ctx - VERIFY_ROWS + 1, dtype=torch.int32, device=dev)
    return partial(verification_scores_paged, q_rows, lse_rows, case.k[None], row_pos, page_start, case.kv_indices,
                   lengths, PAGE, SCALE, out[None])


def bench_scores(report: Report, case: Case, q: torch.Tensor, lse2: torch.Tensor) -> None:
    """Scores from verify's own base-2 LSE equal the fp32 reference (which computes its own LSE)."""
    span = case.ctx - VERIFY_ROWS + 1
    out = torch.full((case.batch, case.ctx), float("nan"), device=case.device)
    launch = scores_launcher(case, q, lse2, out)
    launch()
    scored = torch.tensor([0, GAMMA])
    ref = reference_scores(case, q.view(case.batch, VERIFY_ROWS, HEADS, HEAD_DIM)[:, scored.to(case.device)], scored)
    head, tail = out[:, :span], out[:, span:]
    finite = bool(torch.isfinite(head).all())
    err = rel_err(head, ref[:, :span]) if finite else float("nan")
    close = finite and torch.allclose(head, ref[:, :span], rtol=0.0, atol=SCORE_ATOL)
    tail_ok = bool((tail == -1).all())
    detail = f"finite={finite} allclose(atol={SCORE_ATOL})={close} rel_err={err:.2e} tail=-1:{tail_ok}"
    if report.check(case, "scores", close and err < SCORE_REL_TOL and tail_ok, detail):
        def all_layers() -> None:
            for _ in range(LAYERS):
                launch()

        report.timing(case, "scores_30layer", bench_ms(all_layers), LAYERS * case.batch * span * SLOT_BYTES)


def draft_loop(wrapper: Any, buf: torch.Tensor, indices: torch.Tensor, qs: torch.Tensor,
               kv: tuple[torch.Tensor, torch.Tensor], outs: torch.Tensor) -> None:
    """The engine's draft pattern: one plan, then per layer refill the planned indices buffer and run."""
    for layer in range(indices.shape[0]):
        buf.copy_(indices[layer])
        wrapper.run(qs[layer], kv, out=outs[layer])


def bench_draft(report: Report, w: Wrappers, case: Case) -> None:
    b, dev = case.batch, case.device
    k = math.ceil(DRAFT_RATIO * case.ctx)
    n = k + RECENT
    slots = draft_slots(case, k, LAYERS)  # [L, B, n]
    indices = slots.view(LAYERS, b * n).to(torch.int32)
    buf = indices[0].clone()
    indptr = _indptr(b, n, HOST)
    last_page_len = torch.ones(b, dtype=torch.int32, device=HOST)
    plan = partial(plan_decode, w.draft, indptr, buf, last_page_len, 1)
    log("  draft: plan + first run")
    plan()
    qs = torch.randn(LAYERS, b, HEADS, HEAD_DIM, device=dev, dtype=DTYPE)
    outs = torch.full_like(qs, float("nan"))
    refs = [reference_attention(case.k, case.v, slots[i], qs[i][:, None], None)[0][:, 0] for i in range(LAYERS)]
    draft_bytes = 2.0 * b * n * SLOT_BYTES

    run = partial(w.draft.run, qs[0], case.sparse_kv, out=outs[0])
    run()
    if check_attention(report, case, "draft_1layer", outs[0], refs[0]):
        report.timing(case, "draft_1layer", bench_ms(run), draft_bytes)

    outs.fill_(float("nan"))
    loop = partial(draft_loop, w.draft, buf, indices, qs, case.sparse_kv, outs)
    loop()
    finite = bool(torch.isfinite(outs).all())
    worst = max(rel_err(outs[layer], refs[layer]) for layer in range(LAYERS)) if finite else float("nan")
    # plan() keeps indices.to(device), i.e. this very tensor when it is already there; the outputs prove it too
    held = w.draft._paged_kv_indices_buf is buf
    detail = f"finite={finite} worst layer rel_err={worst:.2e} plan holds buf by reference={held}"
    if report.check(case, "draft_30layer_loop", finite and worst < ATTN_REL_TOL, detail):
        report.timing(case, "draft_30layer_loop", bench_ms(loop), LAYERS * draft_bytes)
    report.timing(case, "plan_draft", host_ms(plan), host=True)

    # the engine's draft kernel: Triton, no plan; selected slots flattened with an indptr, recent ones in a table
    selected = slots[0][:, :k].reshape(-1).to(torch.int32).contiguous()
    sel_indptr = torch.arange(0, b * k + 1, k, dtype=torch.int32, device=dev)
    recent = slots[0][:, k:].to(torch.int32).contiguous()
    counts = torch.full((b,), RECENT, dtype=torch.int32, device=dev)
    triton_run = partial(sparse_draft_attention, qs[0], case.k, case.v, selected, sel_indptr, recent, counts, SCALE)
    if check_attention(report, case, "draft_triton_1layer", triton_run(), refs[0]):
        report.timing(case, "draft_triton_1layer", bench_ms(triton_run), draft_bytes)


def bench_topk(report: Report, case: Case) -> None:
    scores = torch.rand(LAYERS, case.batch, case.ctx, device=case.device)
    budgets = [math.ceil(DRAFT_RATIO * case.ctx)] * case.batch
    run = partial(select_critical_tokens_batched, scores, budgets)
    ref = torch.stack([select_critical_tokens(scores[:, s], budgets[s]) for s in range(case.batch)], dim=1)
    if report.check(case, "topk", torch.equal(run(), ref), "the engine's selection equals top-k + sort per sequence"):
        report.timing(case, "topk", bench_ms(run), scores.numel() * 4.0)


def run_case(report: Report, w: Wrappers, ctx: int, batch: int, device: torch.device) -> None:
    log(f"ctx={ctx} B={batch}: allocating {2 * batch * ctx * SLOT_BYTES / 1e9:.2f} GB of K+V")
    case = make_case(ctx, batch, device)
    run_guarded(report, case, "decode", partial(bench_decode, report, w, case))
    verified = run_guarded(report, case, "verify_fa2", partial(bench_verify, report, w, case))
    if verified is None:
        report.check(case, "scores", False, "not run: verify_fa2 raised, so there is no LSE to score with")
    else:
        run_guarded(report, case, "scores", partial(bench_scores, report, case, *verified))
    run_guarded(report, case, "draft", partial(bench_draft, report, w, case))
    run_guarded(report, case, "topk", partial(bench_topk, report, case))


# ---------------------------------------------------------------------------------------------------- layer


@dataclass
class LayerShape:
    """A token count for the layer variant, keyed like a Case (ctx 0: elementwise work has no context)."""

    batch: int
    ctx: int = 0


@dataclass
class LayerInputs:
    """One layer's elementwise inputs at the default model's shapes, bf16 (cos/sin float32, like the model's)."""

    x: torch.Tensor  # [T, HIDDEN]: a sublayer's output (the delta added to the residual stream)
    residual: torch.Tensor  # [T, HIDDEN]
    weight: torch.Tensor  # [HIDDEN]
    qkv: torch.Tensor  # [T, (HEADS + 2 KV_HEADS) HEAD_DIM]: the fused projection's output
    cos: torch.Tensor  # [T, HEAD_DIM // 2]
    sin: torch.Tensor
    gate_up: torch.Tensor  # [T, 2 INTERMEDIATE]
    k_cache: torch.Tensor  # [4 T, KV_HEADS, HEAD_DIM]
    v_cache: torch.Tensor
    slots: torch.Tensor  # [T] int64: where each token's K/V go

    @property
    def qk(self) -> torch.Tensor:
        """q and k heads as the model rotates them: a view whose row stride also spans v."""
        return self.qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(-1, HEADS + KV_HEADS, HEAD_DIM)

    @property
    def v(self) -> torch.Tensor:
        return self.qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(-1, KV_HEADS, HEAD_DIM)

    @property
    def kv_write(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k_cache, self.v_cache, self.slots


def make_layer_inputs(tokens: int, device: torch.device) -> LayerInputs:
    angles = torch.randint(0, 8192, (tokens, 1), device=device).float() * torch.rand(HEAD_DIM // 2, device=device)
    return LayerInputs(
        x=torch.randn(tokens, HIDDEN, device=device, dtype=DTYPE),
        residual=4 * torch.randn(tokens, HIDDEN, device=device, dtype=DTYPE),
        weight=(1 + 0.1 * torch.randn(HIDDEN, device=device)).to(DTYPE),
        qkv=torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=device, dtype=DTYPE),
        cos=angles.cos(), sin=angles.sin(),
        gate_up=2 * torch.randn(tokens, 2 * INTERMEDIATE, device=device, dtype=DTYPE),
        k_cache=torch.zeros(4 * tokens, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE),
        v_cache=torch.zeros(4 * tokens, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE),
        slots=torch.randperm(4 * tokens, device=device)[:tokens],
    )


def torch_layer_elementwise(i: LayerInputs) -> None:
    """One layer's elementwise work as the torch path runs it: two residual adds + norms, RoPE on q and k with the
    K/V cache write, SiLU·up."""
    _, residual = add_rms_norm(i.x, i.residual, i.weight, RMS_EPS)
    rope_write_kv(i.qk, i.v, i.cos, i.sin, *i.kv_write)
    add_rms_norm(i.x, residual, i.weight, RMS_EPS)
    silu_mul(i.gate_up)


def fused_layer_elementwise(i: LayerInputs) -> None:
    """The same work through the fused kernels (q rotated in place and K/V written to the cache, as the model does)."""
    _, residual = fused_layer.add_rms_norm(i.x, i.residual, i.weight, RMS_EPS)
    fused_layer.rope_write_kv(i.qk, i.v, i.cos, i.sin, *i.kv_write)
    fused_layer.add_rms_norm(i.x, residual, i.weight, RMS_EPS)
    fused_layer.silu_mul(i.gate_up)


def count_kernels(fn: Callable[[], Any]) -> int:
    """CUDA kernels one call of fn launches (each a node when a CUDA graph captures it)."""
    fn()  # compiled and warm, so the profile holds fn's own launches only
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def repeat(times: int, fn: Callable[[], Any]) -> None:
    for _ in range(times):
        fn()


def graph_of(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """fn captured as a CUDA graph, after a warm-up on a side stream (Triton compiles outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def check_layer_op(report: Report, shape: LayerShape, variant: str, out: torch.Tensor, ref: torch.Tensor) -> bool:
    finite = bool(torch.isfinite(out).all())
    err = rel_err(out, ref.float()) if finite else float("nan")
    return report.check(shape, variant, finite and err < LAYER_REL_TOL, f"finite={finite} rel_err={err:.2e}")


def bench_layer(report: Report, tokens: int, device: torch.device) -> None:
    shape = LayerShape(tokens)
    i = make_layer_inputs(tokens, device)
    # checks: each fused kernel against its torch reference (engine/model.py)
    normed, new_res = fused_layer.add_rms_norm(i.x, i.residual, i.weight, RMS_EPS)
    ref_normed, ref_res = add_rms_norm(i.x, i.residual, i.weight, RMS_EPS)
    ok = check_layer_op(report, shape, "layer_add_rms_norm", normed, ref_normed)
    ok &= report.check(shape, "layer_add_rms_norm", torch.equal(new_res, ref_res), "residual sum bit-exact")
    ok &= check_layer_op(report, shape, "layer_rms_norm", fused_layer.rms_norm(i.x, i.weight, RMS_EPS),
                         rms_norm(i.x, i.weight, RMS_EPS))
    ref_caches = (i.k_cache.clone(), i.v_cache.clone())
    ref_q = rope_write_kv(i.qk, i.v, i.cos, i.sin, *ref_caches, i.slots)
    q = fused_layer.rope_write_kv(i.qk.clone(), i.v, i.cos, i.sin, *i.kv_write)
    ok &= check_layer_op(report, shape, "layer_rope", q.flatten(1), ref_q.flatten(1))
    ok &= check_layer_op(report, shape, "layer_rope", i.k_cache[i.slots], ref_caches[0][i.slots])
    ok &= report.check(shape, "layer_rope", torch.equal(i.v_cache, ref_caches[1]), "v written as it was")
    ok &= check_layer_op(report, shape, "layer_silu_mul", fused_layer.silu_mul(i.gate_up), silu_mul(i.gate_up))
    if not ok:
        return

    ops = {
        "rms_norm": (partial(rms_norm, i.x, i.weight, RMS_EPS), partial(fused_layer.rms_norm, i.x, i.weight, RMS_EPS)),
        "add_rms_norm": (partial(add_rms_norm, i.x, i.residual, i.weight, RMS_EPS),
                         partial(fused_layer.add_rms_norm, i.x, i.residual, i.weight, RMS_EPS)),
        "rope": (partial(rope_write_kv, i.qk, i.v, i.cos, i.sin, *i.kv_write),
                 partial(fused_layer.rope_write_kv, i.qk, i.v, i.cos, i.sin, *i.kv_write)),
        "silu_mul": (partial(silu_mul, i.gate_up), partial(fused_layer.silu_mul, i.gate_up)),
    }
    # Timed as a decode step runs them: replayed from a CUDA graph, once per layer (an eager call of a few-us
    # kernel would time the host's launch instead). Per op: one graph of LAYERS calls, its time / LAYERS.
    for op, fns in ops.items():
        for kind, fn in zip(("torch", "fused"), fns):
            report.timing(shape, f"layer_{op}_{kind}", bench_ms(graph_of(partial(repeat, LAYERS, fn)).replay) / LAYERS)
    for kind, per_layer in (("torch", torch_layer_elementwise), ("fused", fused_layer_elementwise)):
        kernels = count_kernels(partial(per_layer, i))
        log(f"  {kind}: {kernels} kernels per layer's elementwise work")
        report.meta.setdefault("layer_kernels_per_layer", {})[kind] = kernels
        graph = graph_of(partial(repeat, LAYERS, partial(per_layer, i)))
        report.timing(shape, f"layer_30layer_graph_{kind}", bench_ms(graph.replay))


def render_layer_table(report: Report, token_counts: list[int]) -> str:
    kernels = report.meta.get("layer_kernels_per_layer", {})
    head = ("| tokens | rms_norm | add + rms_norm | rope (q+k heads) + K/V write | silu·up "
            "| 30 layers' elementwise, one CUDA graph |")
    lines = [(f"layer: torch -> fused Triton, us per call replayed from a CUDA graph (device median), bf16, hidden "
              f"{HIDDEN}, intermediate {INTERMEDIATE}; kernels per layer: torch {kernels.get('torch', '?')}, "
              f"fused {kernels.get('fused', '?')}."), "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for t in token_counts:
        def cell(op: str, t: int = t) -> str:
            old, new = report.find(0, t, f"layer_{op}_torch"), report.find(0, t, f"layer_{op}_fused")
            if old is None or new is None:
                return report.status(0, t, f"layer_{op}")
            return f"{_us(old)} -> {_us(new)} ({old['ms'] / new['ms']:.1f}x)"

        row = [str(t), cell("rms_norm"), cell("add_rms_norm"), cell("rope"), cell("silu_mul"), cell("30layer_graph")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- output


def _us(rec: dict[str, Any] | None) -> str:
    return f"{rec['ms'] * 1e3:.0f}" if rec else "-"


def render_table(report: Report, combos: list[tuple[int, int]]) -> str:
    head = ("| ctx | B | decode cc | decode tc | verify fa2 | verify tc-decode q5 | draft 1 layer "
            "| draft 30-layer loop | scores 30 layers (vs verify x30) | topk | plan dec/ver/draft (host) |")
    lines = [f"copy: {report.copy_gbps:.0f} GB/s read+write on {report.meta.get('device', '?')}. "
             "Times in us (device median; plan: host median); TB/s and % = K+V bytes read / time, "
             "against the copy bandwidth.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for ctx, b in combos:
        def cell(variant: str, pct: bool = False) -> str:
            rec = report.find(ctx, b, variant)
            if rec is None:
                return report.status(ctx, b, variant)
            return f"{_us(rec)} ({rec['gbps'] / 1e3:.2f} TB/s, {rec['pct_copy']:.0f}%)" if pct else _us(rec)

        scores, verify = report.find(ctx, b, "scores_30layer"), report.find(ctx, b, "verify_fa2")
        scores_cell = cell("scores_30layer")
        if scores and verify:
            verify_all = LAYERS * verify["ms"]
            scores_cell += f" ({100 * scores['ms'] / verify_all:.0f}% of {verify_all * 1e3:.0f})"
        plans = "/".join(_us(report.find(ctx, b, f"plan_{p}")) for p in ("decode", "verify", "draft"))
        row = [str(ctx), str(b), cell("decode_cc", True), cell("decode_tc", True), cell("verify_fa2", True),
               cell("verify_tc_decode", True), cell("draft_1layer"), cell("draft_30layer_loop"), scores_cell,
               cell("topk"), plans]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_outputs(report: Report, table: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernel_bench.md").write_text(table + "\n", encoding="utf-8")
    payload = {"meta": report.meta, "copy_gbps": report.copy_gbps, "checks": report.checks, "timings": report.timings}
    (out_dir / "kernel_bench.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for kernel_bench.md and kernel_bench.json")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--quick", action="store_true", help="one small configuration (ctx 1024, B 16)")
    p.add_argument("--layer-tokens", type=int, nargs="+", default=[128, 640],
                   help="token counts of the layer variant (fused decoder-layer kernels)")
    p.add_argument("--layer-only", action="store_true", help="copy and the layer variant only: no FlashInfer needed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.contexts, args.batches = [1024], [16]
    bad = [c for c in args.contexts if c % PAGE or c < 2 * PAGE]
    if bad:
        p.error(f"contexts must be multiples of {PAGE} and at least {2 * PAGE}: {bad}")
    return args


def fitting_combos(contexts: list[int], batches: list[int]) -> list[tuple[int, int]]:
    combos = []
    for ctx in contexts:
        for b in batches:
            model_kv = LAYERS * 2.0 * b * ctx * SLOT_BYTES
            if model_kv > KV_BUDGET_BYTES:
                log(f"skip ctx={ctx} B={b}: {LAYERS}-layer K+V is {model_kv / 1e9:.0f} GB "
                    f"> {KV_BUDGET_BYTES / 1e9:.0f} GB")
            else:
                combos.append((ctx, b))
    return combos


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernel_bench: CUDA is not available; this benchmark only runs on a GPU machine. Nothing was run.",
              file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(args.seed)
    flashinfer = None
    if not args.layer_only:
        import flashinfer  # only importable where CUDA is
    report = Report(meta={
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
        "flashinfer": getattr(flashinfer, "__version__", "?"), "args": {k: str(v) for k, v in vars(args).items()},
    })
    log(f"{report.meta['device']} torch {torch.__version__} triton {triton.__version__} "
        f"flashinfer {report.meta['flashinfer']}")
    measure_copy(report, device)
    torch.cuda.empty_cache()
    tables = []
    if not args.layer_only:
        wrappers = Wrappers.build(flashinfer, device)
        combos = fitting_combos(args.contexts, args.batches)
        for ctx, b in combos:
            run_case(report, wrappers, ctx, b, device)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the next case allocates its own pool
        tables.append(render_table(report, combos))
    for tokens in args.layer_tokens:
        log(f"layer: {tokens} tokens")
        run_guarded(report, LayerShape(tokens), "layer", partial(bench_layer, report, tokens, device))
    tables.append(render_layer_table(report, args.layer_tokens))
    table = "\n\n".join(tables)
    write_outputs(report, table, args.out)
    failed = report.failed
    print(f"\n{len(report.checks)} checks, {len(failed)} failed" + "".join(
        f"\n  FAIL ctx={c.get('ctx')} B={c.get('batch')} {c['variant']}: {c['detail']}" for c in failed))
    print("\n" + table, flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
