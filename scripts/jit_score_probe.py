#!/usr/bin/env python3
"""Probe: can the verification attention itself hand out the two scored rows' logits, so scores need no second read of K?

SpecAttn scores today (kernels/scores.py, `verification_scores_paged`) re-read every cached K of every layer after
the verification to recompute q·k of two rows per request. This script builds a FlashInfer custom attention variant
(`jit_args`, FA2 prefill template, the kernel BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True) runs for
q_len_per_req > 1) whose LogitsTransform hook stores, for two chosen query rows per request, the logit the kernel
feeds its base-2 softmax (x = q·k · sm_scale · log2(e), float32 / bfloat16 / float16) into an extra output
[batch, 2, heads, max_kv_len], over each row's causal span only, and returns the logit unchanged.

One layer of the default model (9 query heads, 3 KV heads, head_dim 64, bf16, NHD, page size 16), batch 128,
context ~8k with shuffled pages and a few odd lengths, 5 verification rows per request (γ = 4), scored rows (0, 4)
(request 3: (2, 2), a single row given twice as the engine does; the last request: (-1, -1), i.e. not scored).

Checks (each a PASS/FAIL line; exit code 1 if any fails or a stage raises):
  1. the variant's output and base-2 LSE equal the stock wrapper's (same plan; bit-exactness is reported);
  2. the stored float32 logits equal a float32 torch q·k·scale·log2(e); exactly the causal span is written
     (a NaN sentinel stays everywhere else, and everywhere for the unscored request);
  3. the kernel's LSE equals torch's; exp2(stored − LSE) equals torch's softmax weights;
  4. the mean weight per position over both rows and all heads, computed from the stored logits by a small Triton
     post-step (and by torch), equals `specattn.kernels.reference.verification_scores` (fp32 inputs) and
     `specattn.kernels.scores.verification_scores_paged` over positions [0, score_len), −1 past it;
  5. bf16 / fp16 stores: the same scores within their precision;
  6. CUDA graphs: the variant captured in a graph and replayed on new queries gives the eager results;
  7. BatchPrefillWithPagedKVCacheWrapper (qo_indptr, causal=True) with the same jit_args gives the same results.
Then times (CUDA-graph replays, triton do_bench median): stock verification; the variant without and with stores;
stock + verification_scores_paged; variant + post-step. Prints the JIT build time and where the JIT cache is.

Usage (GPU machine, repo importable as `specattn`):  python3 scripts/jit_score_probe.py
The first run JIT-compiles the variant module (10 .cu files, nvcc, ~0.5-1 min on 16 cores: the stock module of the
same template took 21 s there) into $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/<version>/<arch>/cached_ops/<URI>;
later runs load the cached .so. Everything else takes well under a minute.
Environment: PROBE_BATCH (128), PROBE_CTX (8192) for a smaller run.
Result on the H200 (docs/results/jit-score-probe-h200.md, perf-notes entry 24): every check passes, but the variant
kernel is 1.8x slower than the stock one even with the hook storing nothing, so fusing loses to the separate kernel.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from types import SimpleNamespace

import torch

T0 = time.perf_counter()
HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16
GROUP = HEADS // KV_HEADS
GAMMA = 4
ROWS = GAMMA + 1  # verification rows per request: the anchor and γ drafts
SCALE = HEAD_DIM**-0.5
LOG2E = math.log2(math.e)
LAYERS = 30
DTYPE = torch.bfloat16
BATCH = int(os.environ.get("PROBE_BATCH", "128"))
CTX = int(os.environ.get("PROBE_CTX", "8192"))

FAILURES: list[str] = []  # names of failed checks and of stages that raised
TIMINGS: list[tuple[str, float, str]] = []  # (label, ms, how)
S = SimpleNamespace()  # what the stages build, for the stages after them


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class Skip(Exception):
    """A stage cannot run because an earlier one failed (that failure is already counted)."""


def need(*names: str) -> None:
    missing = [n for n in names if not hasattr(S, n)]
    if missing:
        raise Skip(f"needs {', '.join(missing)} from an earlier stage")


@contextmanager
def stage(name: str):
    """Run one stage; an exception is printed with its traceback and counted, and the script goes on."""
    log(f"== {name}")
    try:
        yield
    except Skip as exc:
        print(f"  [SKIP] {name}: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 - report and continue
        FAILURES.append(f"stage '{name}' raised {type(exc).__name__}")
        print(f"  [ERROR] stage '{name}' raised:", flush=True)
        text = traceback.format_exc()
        if len(text) > 20000:  # a failed nvcc build: the error lines and the tail are what matter
            lines = text.splitlines()
            errors = [ln for ln in lines if "error" in ln.lower()][:60]
            text = "\n".join(lines[:20] + ["  ... (error lines) ..."] + errors + ["  ... (tail) ..."] + lines[-60:])
        print(text, flush=True)
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a sticky CUDA error: later stages will say so
            pass


def check(name: str, ok: bool, detail: str) -> bool:
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)
    return ok


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, mask: torch.Tensor | None = None) -> bool:
    """PASS if max|got − ref| ≤ tol · max|ref| over the masked entries (and both are finite there)."""
    g, r = got.float(), ref.float()
    if mask is not None:
        g, r = g[mask], r[mask]
    if g.numel() == 0:
        return check(name, False, "nothing to compare")
    finite = bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all())
    diff = (g - r).abs()
    scale = max(float(r.abs().max()), 1e-30)
    max_abs = float(torch.nan_to_num(diff, nan=float("inf")).max())
    rel_l1 = float(diff.nansum() / r.abs().sum().clamp_min(1e-30))
    exact = bool(torch.equal(g, r))
    detail = (f"max|d|={max_abs:.3e}  max|d|/max|ref|={max_abs / scale:.3e}  relL1={rel_l1:.3e}  (tol {tol:g})"
              f"{'  bit-exact' if exact else ''}{'' if finite else '  NON-FINITE values'}")
    return check(name, finite and max_abs <= tol * scale, detail)


# ---------------------------------------------------------------------------------------------- the variant

# The FA2 prefill kernel (flashinfer/attention/prefill.cuh, BatchPrefillWithPagedKVCacheKernel) builds one variant
# object per CTA (batch_idx = request index) and, per score tile, calls LogitsTransform(params, logits, batch_idx,
# qo_idx, kv_idx, qo_head_idx, kv_head_idx) with logits = the raw fp32 q·k (no sm_scale, no log2(e): those are
# applied afterwards, as x·sm_scale_log2 − m, in update_mdo_states), BEFORE the causal mask, for every tile row,
# including padded rows (qo_idx ≥ qo_len) and rows past their causal limit, but never for kv_idx ≥ its KV chunk's end.
# qo_idx is the row inside the request (q_indptr-relative; the decode wrapper's q_len_per_req packing makes request b
# rows [b·5, b·5 + 5)), kv_idx the position inside the request's KV. So the hook itself filters: the two scored rows
# only, causal positions only (kv_idx + qo_len ≤ kv_len + qo_idx, the kernel's own causal test).
# Members qo_len, kv_len, window_left, sm_scale_log2 are read by the kernel and must exist (as in DefaultAttention).
# params.score_rows / maybe_score_* / sm_scale / score_stride are this module's additional tensors and scalars.
VARIANT_DECL = r"""
struct SpecAttnScoreRows : AttentionVariantBase {
  static constexpr bool use_softmax = true;

  uint32_t qo_len, kv_len, window_left;
  float sm_scale_log2;
  uint32_t row_a, row_b;  // this request's two scored rows (-1: none)

  template <typename Params>
  __device__ __host__ SpecAttnScoreRows(const Params& params, uint32_t batch_idx, uint8_t* smem_ptr) {
    qo_len = params.get_qo_len(batch_idx);
    kv_len = params.get_kv_len(batch_idx);
    window_left = (params.window_left >= 0) ? params.window_left : kv_len;
    // the same expression (double sm_scale times float log2e) as DefaultAttention: identical softmax math
    sm_scale_log2 = params.sm_scale * math::log2e;
    row_a = static_cast<uint32_t>(params.score_rows[2 * batch_idx]);
    row_b = static_cast<uint32_t>(params.score_rows[2 * batch_idx + 1]);
  }

  template <typename Params>
  __device__ __forceinline__ void store_score(const Params& params, uint32_t batch_idx, uint32_t slot,
                                              uint32_t qo_head_idx, uint32_t kv_idx, float x) {
    // out[batch_idx, slot, qo_head_idx, kv_idx], row length score_stride
    const size_t off = ((size_t(batch_idx) * 2 + slot) * params.num_qo_heads + qo_head_idx) *
                           size_t(params.score_stride) + kv_idx;
    if (params.maybe_score_f32 != nullptr) params.maybe_score_f32[off] = x;
    if (params.maybe_score_bf16 != nullptr) params.maybe_score_bf16[off] = __float2bfloat16(x);
    if (params.maybe_score_f16 != nullptr) params.maybe_score_f16[off] = __float2half(x);
  }

  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {
    if ((qo_idx == row_a || qo_idx == row_b) && kv_idx + qo_len <= kv_len + qo_idx) {
      // the base-2 logit the softmax exponentiates: weight = exp2(x - lse2)
      const float x = float(logits) * sm_scale_log2;
      if (qo_idx == row_a) store_score(params, batch_idx, 0u, qo_head_idx, kv_idx, x);
      if (qo_idx == row_b) store_score(params, batch_idx, 1u, qo_head_idx, kv_idx, x);
    }
    return logits;
  })
};
"""

TENSOR_NAMES = ["score_rows", "maybe_score_f32", "maybe_score_bf16", "maybe_score_f16"]  # maybe_*: may be None
TENSOR_CTYPES = ["int32_t", "float", "__nv_bfloat16", "half"]  # NOT checked at run time: pass exactly these dtypes
SCALAR_NAMES = ["sm_scale", "score_stride"]
SCALAR_CTYPES = ["double", "int64_t"]
# the URI names the build directory and the .so: a new one for every change of the variant source
URI = "specattn_score_rows_" + hashlib.sha1(VARIANT_DECL.encode()).hexdigest()[:12]
# positional order of gen_customize_batch_prefill_module after `backend` (flashinfer/jit/attention/modules.py)
JIT_ARGS = [
    URI, DTYPE, DTYPE, DTYPE, torch.int32, HEAD_DIM, HEAD_DIM,
    TENSOR_NAMES, TENSOR_CTYPES, SCALAR_NAMES, SCALAR_CTYPES,
    "SpecAttnScoreRows", VARIANT_DECL,
]


# ----------------------------------------------------------------------------------------- post-step (Triton)

try:  # Triton is on every machine that has torch's CUDA build; the script must still parse/import without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _mean_weight_kernel(logit_ptr, lse_ptr, row_pos_ptr, lengths_ptr, out_ptr, out_len,
                            stride_lb, stride_ls, stride_lh, HEADS_: tl.constexpr, BLOCK_N: tl.constexpr):
        # one request × BLOCK_N positions: mean over 2 rows × HEADS_ heads of exp2(x − lse2), 0 past a row's limit
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        length = tl.load(lengths_ptr + b)
        valid = offs < length
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(2):
            limit = tl.load(row_pos_ptr + b * 2 + s)
            keep = valid & (offs <= limit)
            for h in tl.static_range(HEADS_):
                lse = tl.load(lse_ptr + (b * 2 + s) * HEADS_ + h)
                x = tl.load(logit_ptr + b * stride_lb + s * stride_ls + h * stride_lh + offs, mask=keep, other=0.0)
                total += tl.where(keep, tl.exp2(x.to(tl.float32) - lse), 0.0)
        mean = total / (2 * HEADS_)
        tl.store(out_ptr + b * out_len + offs, tl.where(valid, mean, -1.0), mask=offs < out_len)


def post_step(logits: torch.Tensor, lse_rows: torch.Tensor, row_pos: torch.Tensor, lengths: torch.Tensor,
              out: torch.Tensor, block_n: int = 256) -> torch.Tensor:
    """out[b, j] = mean weight of request b's two scored rows (all heads) on position j; −1 past lengths[b].

    The step that replaces verification_scores_paged: it reads the stored logits instead of K.
    logits: [B, 2, H, L] stored base-2 logits (float32 / bfloat16 / float16), lse_rows: [B, 2, H] float32 base 2,
    row_pos: [B, 2] int32 causal limits, lengths: [B] int32 (score_len), out: [B, out_len] float32.
    """
    b, _, h, _ = logits.shape
    assert logits.stride(3) == 1 and lse_rows.is_contiguous() and out.is_contiguous()
    grid = (b, triton.cdiv(out.shape[1], block_n))
    _mean_weight_kernel[grid](logits, lse_rows, row_pos, lengths, out, out.shape[1],
                              logits.stride(0), logits.stride(1), logits.stride(2),
                              HEADS_=h, BLOCK_N=block_n, num_warps=4)
    return out


def post_step_torch(logits: torch.Tensor, lse_rows: torch.Tensor, row_pos: torch.Tensor,
                    lengths: torch.Tensor, out_len: int) -> torch.Tensor:
    """The same mean in plain torch (the check of the Triton post-step)."""
    j = torch.arange(logits.shape[3], device=logits.device)
    keep = (j[None, None, :] <= row_pos[:, :, None].long()) & (j[None, None, :] < lengths[:, None, None].long())
    w = torch.exp2(logits.float() - lse_rows[..., None]).masked_fill(~keep[:, :, None, :], 0.0)
    mean = w.mean(dim=(1, 2))[:, :out_len]
    valid = torch.arange(out_len, device=logits.device)[None, :] < lengths[:, None].long()
    return torch.where(valid, mean, torch.full_like(mean, -1.0))


# ------------------------------------------------------------------------------------------------ helpers

def make_case(device: torch.device) -> SimpleNamespace:
    """Random paged bf16 K/V of one layer, shuffled page ids, 5 query rows per request, the scored rows."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    kv_lens = CTX - torch.randint(0, 48, (BATCH,), generator=gen)
    kv_lens[0] = CTX
    if BATCH > 3:  # a short request and one that ends mid-page, besides the ~8k ones
        kv_lens[1], kv_lens[2] = min(37, CTX), min(1003, CTX)
    pages = (kv_lens + PAGE - 1) // PAGE
    indptr = torch.zeros(BATCH + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0)
    total = int(indptr[-1])
    num_pages = total + 64  # a few pages no request owns: the shuffled ids leave holes
    indices = torch.randperm(num_pages, generator=gen)[:total].to(torch.int32)
    last_len = (kv_lens - (pages - 1) * PAGE).to(torch.int32)

    rows = torch.tensor([[0, GAMMA]] * BATCH, dtype=torch.int32)  # the engine's scored pair: first and last row
    if BATCH > 4:
        rows[3] = torch.tensor([2, 2])  # one scored row counted twice (the engine's single-row convention)
        rows[-1] = torch.tensor([-1, -1])  # not scored: its slots must stay untouched
    enabled = rows[:, 0] >= 0
    rows_c = rows.clamp_min(0)
    row_pos = (kv_lens[:, None] - ROWS + rows_c).to(torch.int32)  # absolute position = causal limit of each row
    # scores cover [0, anchor]: the first verification row's span, as engine.py's score_len = start + num_tokens
    score_len = torch.where(enabled, kv_lens - GAMMA, torch.zeros_like(kv_lens)).to(torch.int32)
    max_kv = int(kv_lens.max())

    k_paged = torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v_paged = torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    # queries a bit larger than K so softmaxes are peaked as in a real model (max weight ≫ 1/ctx)
    q = (torch.randn(BATCH * ROWS, HEADS, HEAD_DIM, device=device) * 2.0).to(DTYPE)
    dev = dict(device=device)
    return SimpleNamespace(
        kv_lens=kv_lens, pages=pages, indptr=indptr, indices=indices, indices_dev=indices.to(**dev),
        last_len=last_len, num_pages=num_pages, rows=rows, rows_dev=rows.to(**dev), enabled=enabled.to(**dev),
        rows_c_dev=rows_c.long().to(**dev), row_pos_dev=row_pos.to(**dev), score_len=score_len,
        score_len_dev=score_len.to(**dev), max_kv=max_kv, out_len=max(int(score_len.max()), 1),
        k_paged=k_paged, v_paged=v_paged, q=q, device=device,
    )


def decode_wrapper(fi, workspace: torch.Tensor, case: SimpleNamespace, jit_args=None):
    """The engine's verification wrapper (engine/flashinfer_attention.py `_graph_plan`), optionally with the variant."""
    i32 = dict(dtype=torch.int32, device=case.device)
    extra = {} if jit_args is None else {"jit_args": jit_args}
    return fi.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, backend="fa2", use_tensor_cores=True,
        paged_kv_indptr_buffer=torch.zeros(BATCH + 1, **i32),
        paged_kv_indices_buffer=torch.zeros(case.num_pages + BATCH, **i32),
        paged_kv_last_page_len_buffer=torch.ones(BATCH, **i32), **extra,
    )


def plan_decode(wrapper, case: SimpleNamespace) -> None:
    # sm_scale here only reaches the stock kernel; the variant gets it as its scalar `sm_scale` at run()
    wrapper.plan(case.indptr, case.indices_dev, case.last_len, HEADS, KV_HEADS, HEAD_DIM, PAGE,
                 q_len_per_req=ROWS, sm_scale=SCALE, q_data_type=DTYPE, kv_data_type=DTYPE)


def run_variant(wrapper, case: SimpleNamespace, f32=None, bf16=None, f16=None, q=None):
    # additional tensors in TENSOR_NAMES order, then the scalars (flashinfer.utils.prepare_jit_additional_args)
    q = case.q if q is None else q
    return wrapper.run(q, (case.k_paged, case.v_paged), case.rows_dev, f32, bf16, f16, SCALE, case.max_kv,
                       return_lse=True)


def score_buffer(case: SimpleNamespace, dtype: torch.dtype) -> torch.Tensor:
    # NaN sentinel: positions the kernel must not write stay NaN
    return torch.full((BATCH, 2, HEADS, case.max_kv), float("nan"), dtype=dtype, device=case.device)


def gather_rows(case: SimpleNamespace, q: torch.Tensor, lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored rows' queries [B, 2, H, d] and base-2 LSEs [B, 2, H] (unscored requests: row 0)."""
    idx = case.rows_c_dev
    q_rows = q.view(BATCH, ROWS, HEADS, HEAD_DIM).gather(1, idx[:, :, None, None].expand(BATCH, 2, HEADS, HEAD_DIM))
    lse_rows = lse2.view(BATCH, ROWS, HEADS).gather(1, idx[:, :, None].expand(BATCH, 2, HEADS))
    return q_rows.contiguous(), lse_rows.contiguous()


def capture(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, as torch requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    torch.cuda.synchronize()
    return graph, result


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    if "return_mode" in inspect.signature(do_bench).parameters:
        return float(do_bench(fn, warmup=25, rep=150, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=150, quantiles=[0.5])[0])


def timed(label: str, fn) -> float | None:
    """Median device time of fn in ms, replayed from a CUDA graph (as the engine runs it); eager if capture fails."""
    try:
        graph, _ = capture(fn)
        ms, how = bench_ms(graph.replay), "graph"
    except Exception as exc:  # noqa: BLE001
        print(f"  graph capture of '{label}' failed ({type(exc).__name__}: {exc}); timing eagerly", flush=True)
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        ms, how = bench_ms(fn), "eager"
    TIMINGS.append((label, ms, how))
    log(f"  {label}: {ms * 1e3:.1f} us ({how})")
    return ms


# ------------------------------------------------------------------------------------------------- stages

def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be fp32
    torch.set_float32_matmul_precision("highest")

    with stage("environment"):
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        import flashinfer
        from flashinfer.jit import env as jit_env

        S.fi = flashinfer
        S.device = torch.device("cuda")
        print(f"  torch {torch.__version__}  flashinfer {getattr(flashinfer, '__version__', '?')}  "
              f"GPU {torch.cuda.get_device_name()}  batch {BATCH}  ctx {CTX}")
        print(f"  JIT workspace {jit_env.FLASHINFER_WORKSPACE_DIR} (FLASHINFER_WORKSPACE_BASE="
              f"{os.environ.get('FLASHINFER_WORKSPACE_BASE', '<unset: $HOME>')}, FLASHINFER_CUDA_ARCH_LIST="
              f"{os.environ.get('FLASHINFER_CUDA_ARCH_LIST', '<unset: detected>')}, MAX_JOBS="
              f"{os.environ.get('MAX_JOBS', '<unset: ninja default>')})")
        print(f"  this module: sources {jit_env.FLASHINFER_GEN_SRC_DIR / URI}, build+.so {jit_env.FLASHINFER_JIT_DIR / URI}")
        S.jit_so = jit_env.FLASHINFER_JIT_DIR / URI / f"{URI}.so"

    with stage("data"):
        need("device")
        S.case = make_case(S.device)
        c = S.case
        S.workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=S.device)  # shared, as in the engine
        print(f"  {BATCH} requests, kv_len {int(c.kv_lens.min())}..{c.max_kv}, {c.num_pages} pages, "
              f"K per layer {int(c.kv_lens.sum()) * KV_HEADS * HEAD_DIM * 2 / 1e6:.1f} MB")

    with stage("stock verification (engine's wrapper)"):
        need("case")
        c = S.case
        t = time.perf_counter()
        S.stock = decode_wrapper(S.fi, S.workspace, c)
        plan_decode(S.stock, c)
        S.out_stock, S.lse_stock = S.stock.run(c.q, (c.k_paged, c.v_paged), return_lse=True)
        torch.cuda.synchronize()
        log(f"  stock module load/build + first run: {time.perf_counter() - t:.1f} s")

    with stage("JIT build of the variant"):
        need("case")
        existed = S.jit_so.exists()
        t = time.perf_counter()
        # use_tensor_cores=True: the decode wrapper builds the *prefill* module from jit_args (decode.py __init__)
        S.var = decode_wrapper(S.fi, S.workspace, S.case, jit_args=JIT_ARGS)
        S.build_s = time.perf_counter() - t
        log(f"  JIT build + load: {S.build_s:.1f} s ({'the .so was already cached' if existed else 'cold build'})")

    with stage("variant vs stock: output and LSE"):
        need("var", "out_stock")
        c = S.case
        plan_decode(S.var, c)
        S.buf32 = score_buffer(c, torch.float32)
        S.out_var, S.lse_var = run_variant(S.var, c, f32=S.buf32)
        torch.cuda.synchronize()
        compare("variant output == stock output", S.out_var, S.out_stock, 1e-2)
        compare("variant LSE == stock LSE", S.lse_var, S.lse_stock, 1e-5)
        out0, lse0 = run_variant(S.var, c)  # no stores at all: the hook only filters
        compare("variant (no stores) output == stock", out0, S.out_stock, 1e-2)
        compare("variant (no stores) LSE == stock", lse0, S.lse_stock, 1e-5)

    with stage("stored logits vs torch fp32"):
        need("buf32")
        c = S.case
        # K of every request in position order (the reference gathers; the kernel reads pages in place)
        max_pages = int(c.pages.max())
        table = torch.zeros(BATCH, max_pages, dtype=torch.long)
        for b in range(BATCH):
            table[b, : int(c.pages[b])] = c.indices[int(c.indptr[b]): int(c.indptr[b + 1])].long()
        S.k_seq = c.k_paged[table.to(S.device)].view(BATCH, max_pages * PAGE, KV_HEADS, HEAD_DIM)[:, : c.max_kv]
        S.q_rows, S.lse_rows = gather_rows(c, c.q, S.lse_var)
        grouped = S.q_rows.float().view(BATCH, 2, KV_HEADS, GROUP, HEAD_DIM)
        x_ref = torch.einsum("brkgd,bnkd->brkgn", grouped, S.k_seq.float()).reshape(BATCH, 2, HEADS, c.max_kv)
        S.x_ref = x_ref * (SCALE * LOG2E)
        j = torch.arange(c.max_kv, device=S.device)
        S.causal = j[None, None, :] <= c.row_pos_dev[:, :, None].long()  # [B, 2, L]
        written = (S.causal & c.enabled[:, None, None])[:, :, None, :].expand(BATCH, 2, HEADS, c.max_kv)
        S.written = written
        got_written = torch.isfinite(S.buf32)
        check("exactly the causal span of the scored rows is written",
              bool(torch.equal(got_written, written)),
              f"{int(got_written.sum())} written, {int(written.sum())} expected, "
              f"{int((got_written & ~written).sum())} outside the span, {int((written & ~got_written).sum())} missing")
        compare("stored f32 logits == q·k·scale·log2e (fp32 torch)", S.buf32, S.x_ref, 1e-5, mask=written)

    with stage("LSE and weights"):
        need("x_ref")
        c = S.case
        ok_rows = c.enabled[:, None, None].expand(BATCH, 2, HEADS)
        masked = S.x_ref.masked_fill(~S.causal[:, :, None, :], float("-inf"))
        lse_ref = torch.logsumexp(masked * math.log(2.0), dim=-1) / math.log(2.0)  # base 2
        S.lse_ref = lse_ref
        # the kernel's online softmax (fp32, tile by tile) differs from torch's by up to ~4e-4 relative on the H200
        compare("kernel base-2 LSE == torch", S.lse_rows, lse_ref, 1e-3, mask=ok_rows)
        w_kernel = torch.exp2(S.buf32 - S.lse_rows[..., None])
        w_ref = torch.exp2(masked - lse_ref[..., None])
        compare("exp2(stored − kernel LSE) == torch softmax weights", w_kernel, w_ref, 1e-3, mask=S.written)
        del w_kernel, w_ref, masked

    with stage("mean scores: post-step vs reference and verification_scores_paged"):
        need("lse_rows")
        from specattn.kernels.reference import verification_scores
        from specattn.kernels.scores import verification_scores_paged

        c = S.case
        S.post_step = post_step
        valid = (torch.arange(c.out_len, device=S.device)[None, :] < c.score_len_dev[:, None].long())
        S.valid = valid
        ref = verification_scores(S.q_rows.float(), S.k_seq.float(), S.causal, SCALE)[:, : c.out_len]
        S.ref_scores = ref
        S.scores_f32 = torch.empty(BATCH, c.out_len, device=S.device)
        S.post_step(S.buf32, S.lse_rows, c.row_pos_dev, c.score_len_dev, S.scores_f32)
        compare("post-step (f32 logits) == reference.verification_scores", S.scores_f32, ref, 1e-3, mask=valid)
        check("post-step writes −1 past score_len", bool((S.scores_f32[~valid] == -1).all()),
              f"{int((~valid).sum())} positions past their length")
        torch_mean = post_step_torch(S.buf32, S.lse_rows, c.row_pos_dev, c.score_len_dev, c.out_len)
        compare("post-step Triton == torch", S.scores_f32, torch_mean, 1e-5)
        S.paged_out = torch.empty(1, BATCH, c.out_len, device=S.device)
        S.k_flat = c.k_paged.view(1, -1, KV_HEADS, HEAD_DIM)
        S.paged_args = (S.q_rows[None], S.lse_rows[None], S.k_flat, c.row_pos_dev, c.indptr[:-1].to(S.device),
                        c.indices_dev, c.score_len_dev)
        verification_scores_paged(*S.paged_args, page_size=PAGE, scale=SCALE, out=S.paged_out)
        S.verification_scores_paged = verification_scores_paged
        compare("verification_scores_paged == reference", S.paged_out[0], ref, 1e-3, mask=valid)
        compare("post-step (f32 logits) == verification_scores_paged", S.scores_f32, S.paged_out[0], 1e-4, mask=valid)

    with stage("bf16 / fp16 stores"):
        need("scores_f32")
        c = S.case
        for name, dtype, tol_logit, tol_scores in (("bf16", torch.bfloat16, 1e-2, 0.1), ("fp16", torch.float16, 1e-3, 1e-2)):
            buf = score_buffer(c, dtype)
            kw = {"bf16": buf} if dtype == torch.bfloat16 else {"f16": buf}
            out, lse = run_variant(S.var, c, **kw)
            torch.cuda.synchronize()
            compare(f"{name}: output == stock", out, S.out_stock, 1e-2)
            check(f"{name}: exactly the causal span is written", bool(torch.equal(torch.isfinite(buf), S.written)), "")
            # tolerances are bug detectors (indexing); the printed errors are the precision finding
            compare(f"{name}: stored logits vs fp32", buf, S.x_ref, tol_logit, mask=S.written)
            scores = torch.empty(BATCH, c.out_len, device=S.device)
            S.post_step(buf, S.lse_rows, c.row_pos_dev, c.score_len_dev, scores)
            compare(f"{name}: post-step scores vs reference", scores, S.ref_scores, tol_scores, mask=S.valid)
            setattr(S, f"buf_{name}", buf)

    with stage("CUDA graph capture and replay of the variant"):
        need("buf32", "x_ref")
        c = S.case
        q_new = (torch.randn_like(c.q, dtype=torch.float32) * 2.0).to(DTYPE)
        q_graph = c.q.clone()  # the graph reads this tensor's memory; refilled before the replay
        buf_graph = score_buffer(c, torch.float32)
        graph, (out_g, lse_g) = capture(lambda: run_variant(S.var, c, f32=buf_graph, q=q_graph))
        q_graph.copy_(q_new)
        buf_graph.fill_(float("nan"))
        graph.replay()
        buf_eager = score_buffer(c, torch.float32)
        out_e, lse_e = run_variant(S.var, c, f32=buf_eager, q=q_new)
        torch.cuda.synchronize()
        compare("graph replay output == eager (new queries)", out_g, out_e, 1e-6)
        compare("graph replay LSE == eager", lse_g, lse_e, 1e-6)
        compare("graph replay stored logits == eager", buf_graph, buf_eager, 1e-6, mask=S.written)
        check("graph replay wrote the new queries' logits", not torch.equal(buf_graph[S.written], S.buf32[S.written]), "")
        del graph, buf_graph, buf_eager

    with stage("alternative: BatchPrefillWithPagedKVCacheWrapper, same jit_args"):
        need("buf32", "out_var")
        c = S.case
        t = time.perf_counter()
        pw = S.fi.BatchPrefillWithPagedKVCacheWrapper(S.workspace, "NHD", backend="fa2", jit_args=JIT_ARGS)
        log(f"  prefill wrapper with the variant (module already built): {time.perf_counter() - t:.1f} s")
        qo_indptr = torch.arange(BATCH + 1, dtype=torch.int32) * ROWS
        pw.plan(qo_indptr, c.indptr, c.indices_dev, c.last_len, HEADS, KV_HEADS, HEAD_DIM, PAGE, causal=True,
                sm_scale=SCALE, q_data_type=DTYPE, kv_data_type=DTYPE)
        buf = score_buffer(c, torch.float32)
        out_p, lse_p = pw.run(c.q, (c.k_paged, c.v_paged), c.rows_dev, buf, None, None, SCALE, c.max_kv,
                              return_lse=True)
        torch.cuda.synchronize()
        compare("prefill-wrapper variant output == stock", out_p, S.out_stock, 1e-2)
        compare("prefill-wrapper variant LSE == stock", lse_p, S.lse_stock, 1e-5)
        check("prefill-wrapper variant writes exactly the causal span", bool(torch.equal(torch.isfinite(buf), S.written)), "")
        compare("prefill-wrapper stored logits == decode-wrapper's", buf, S.buf32, 1e-6, mask=S.written)
        del buf

    with stage("timing (one layer)"):
        need("scores_f32", "paged_out")
        c = S.case
        # free the references first: timing wants a quiet memory pool
        for name in ("k_seq", "x_ref", "ref_scores"):
            if hasattr(S, name):
                delattr(S, name)
        torch.cuda.empty_cache()
        stock = lambda: S.stock.run(c.q, (c.k_paged, c.v_paged), return_lse=True)  # noqa: E731
        t_stock = timed("stock verification", stock)
        timed("variant, no stores", lambda: run_variant(S.var, c))
        # the store buffers that exist (bf16/fp16 ones come from their stage; if it failed, those rows are left out)
        stores = [("f32", {"f32": S.buf32})]
        stores += [(name, {key: getattr(S, f"buf_{name}")}) for name, key in (("fp16", "f16"), ("bf16", "bf16"))
                   if hasattr(S, f"buf_{name}")]
        for name, kw in stores:
            timed(f"variant + {name} stores", lambda kw=kw: run_variant(S.var, c, **kw))
        scores = lambda: S.verification_scores_paged(*S.paged_args, page_size=PAGE, scale=SCALE, out=S.paged_out)  # noqa: E731
        t_scores = timed("verification_scores_paged alone", scores)

        def stock_and_scores():
            out, lse2 = stock()
            q_rows, lse_rows = gather_rows(c, c.q, lse2)  # what the engine copies per layer
            S.verification_scores_paged(q_rows[None], lse_rows[None], *S.paged_args[2:], page_size=PAGE,
                                        scale=SCALE, out=S.paged_out)
            return out

        def variant_and_post(buf):
            def fn():
                out, lse2 = run_variant(S.var, c, **buf)
                _, lse_rows = gather_rows(c, c.q, lse2)
                S.post_step(next(iter(buf.values())), lse_rows, c.row_pos_dev, c.score_len_dev, S.scores_f32)
                return out
            return fn

        base = timed("stock + verification_scores_paged", stock_and_scores)
        fused = {}
        for name, kw in stores:
            timed(f"post-step alone ({name} logits)",
                  lambda b=next(iter(kw.values())): S.post_step(b, S.lse_rows, c.row_pos_dev, c.score_len_dev, S.scores_f32))
            fused[name] = timed(f"variant + {name} stores + post-step", variant_and_post(kw))

        k_mb = int(c.kv_lens.sum()) * KV_HEADS * HEAD_DIM * 2 / 1e6
        print("\n  one layer, batch %d, ctx ~%d" % (BATCH, CTX))
        print("  %-44s %10s  %s" % ("what", "us", "how"))
        for label, ms, how in TIMINGS:
            print("  %-44s %10.1f  %s" % (label, ms * 1e3, how))
        print(f"  K read by verification_scores_paged: {k_mb:.0f} MB/layer"
              + (f" ({k_mb / 1e3 / (t_scores * 1e-3):.0f} GB/s)" if t_scores else ""))
        for name, size in (("f32", 4), ("16-bit", 2)):
            mb = int(S.written.sum()) * size / 1e6
            print(f"  logits written + read back ({name}): {mb:.0f} + {mb:.0f} MB/layer")
        if base and t_stock:
            for name, ms in fused.items():
                if ms:
                    print(f"  per step ({LAYERS} layers) with {name} stores: {LAYERS * base:.2f} ms -> {LAYERS * ms:.2f} ms "
                          f"(saves {LAYERS * (base - ms):.2f} ms)")

    if hasattr(S, "build_s"):
        log(f"JIT build of the variant took {S.build_s:.1f} s")
    print("\nFAILED: " + "; ".join(FAILURES) if FAILURES else "\nALL CHECKS PASSED", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
