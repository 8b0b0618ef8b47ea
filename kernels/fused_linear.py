"""Triton kernels for the decoder layer's two input projections with their neighbours fused in: the input RMSNorm
(with the residual add) before the q/k/v projection and RoPE with the K/V cache write after it; the post-attention
RMSNorm before the gate/up projection and SiLU·up after it.

At decode batch sizes a projection of a small model is a few microseconds of latency, not of math or bytes, and so
is each elementwise kernel around it: one launch instead of three (norm, GEMM, RoPE or SiLU) takes about a third of
a forward's kernels away. Each program computes a [BLOCK_M, columns] tile over the whole hidden size: it first sums
the squares of its rows (the norm needs the full row), then runs the K loop on the normed rows, and its epilogue
does what the next kernel did. The q/k/v kernel's tile is one head, its two halves in two accumulators, so
rotate-half RoPE (and Qwen3's per-head norm) happens in registers.

The plain-torch references are the compositions they replace (engine/model.py: `add_rms_norm`, `F.linear`,
`rope_write_kv`, `silu_mul`); tests compare the two. Intermediates are rounded to the model dtype where the
reference rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64
# rows per program: the same for every batch size, so a row's result never depends on how many rows run with it
BLOCK_M = 32


@triton.jit
def _normed_rows(x_ptr, res_ptr, new_res_ptr, offs_m, m_mask, stride_x, stride_r, stride_nr, hidden, eps,
                 store_rows, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of each row of x + residual (rounded to the model dtype first, like the reference's add); stores
    x + residual for rows below store_rows (all rows for one program of those sharing them, none for the others)."""
    offs_k = tl.arange(0, BLOCK_K)
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + offs_k
        mask = m_mask[:, None] & (kk < hidden)[None, :]
        h = tl.load(x_ptr + offs_m[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + offs_m[:, None] * stride_r + kk[None, :], mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
            tl.store(new_res_ptr + offs_m[:, None] * stride_nr + kk[None, :], h, mask=mask & (offs_m < store_rows)[:, None])
        hf = h.to(tl.float32)
        squares += tl.sum(hf * hf, axis=1)
    return tl.rsqrt(squares / hidden + eps)


@triton.jit
def _normed_chunk(x_ptr, res_ptr, norm_w_ptr, offs_m, m_mask, kk, stride_x, stride_r, rstd, hidden,
                  HAS_RESIDUAL: tl.constexpr):
    """Columns kk of the normed rows, as the reference has them: (h · rstd) rounded, times the norm weight, rounded."""
    k_mask = kk < hidden
    mask = m_mask[:, None] & k_mask[None, :]
    h = tl.load(x_ptr + offs_m[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs_m[:, None] * stride_r + kk[None, :], mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    g = tl.load(norm_w_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
    return ((h.to(tl.float32) * rstd[:, None]).to(h.dtype).to(tl.float32) * g[None, :]).to(h.dtype)


@triton.jit
def _norm_qkv_rope_kernel(
    x_ptr,  # [rows, hidden] what the last sublayer adds to the residual stream (or the embeddings)
    res_ptr,  # [rows, hidden] the residual stream; unused unless HAS_RESIDUAL
    norm_w_ptr,  # [hidden]
    w_ptr,  # [(heads + 2 kv_heads) head_dim, hidden] q, k, v projections stacked
    bias_ptr,  # [(heads + 2 kv_heads) head_dim]; unused unless HAS_BIAS
    q_norm_ptr,  # [head_dim] Qwen3's per-head norms; unused unless QK_NORM
    k_norm_ptr,
    cos_ptr,  # [rows, head_dim // 2] float32
    sin_ptr,
    q_ptr,  # [rows, heads, head_dim] out: rotated q
    new_res_ptr,  # [rows, hidden] out: x + residual; unused unless HAS_RESIDUAL
    k_cache_ptr,  # [slots, kv_heads, head_dim] contiguous
    v_cache_ptr,
    slot_ptr,  # [rows] int64
    rows, hidden, heads, kv_heads, half, eps,
    stride_x, stride_r, stride_nr, stride_c, stride_q,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QK_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    head = tl.program_id(1)  # q heads, then k heads, then v heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    offs_m = offs_m.to(tl.int64)
    rstd = _normed_rows(x_ptr, res_ptr, new_res_ptr, offs_m, m_mask, stride_x, stride_r, stride_nr, hidden, eps,
                        tl.where(head == 0, rows, 0), HAS_RESIDUAL, BLOCK_M, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < half
    w_first = head * 2 * half + offs_d  # weight rows of the head's first half; its second half is `half` on
    acc1 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + offs_k
        a = _normed_chunk(x_ptr, res_ptr, norm_w_ptr, offs_m, m_mask, kk, stride_x, stride_r, rstd, hidden,
                          HAS_RESIDUAL)
        w_mask = (kk < hidden)[:, None] & d_mask[None, :]
        w1 = tl.load(w_ptr + w_first[None, :].to(tl.int64) * hidden + kk[:, None], mask=w_mask, other=0.0)
        w2 = tl.load(w_ptr + (w_first + half)[None, :].to(tl.int64) * hidden + kk[:, None], mask=w_mask, other=0.0)
        if UPCAST:
            a, w1, w2 = a.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32)
        acc1 = tl.dot(a, w1, acc1, input_precision=PRECISION)
        acc2 = tl.dot(a, w2, acc2, input_precision=PRECISION)
    dtype = q_ptr.dtype.element_ty
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + w_first, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(bias_ptr + w_first + half, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    # the projection's output, rounded as the reference's F.linear rounds it
    y1 = acc1.to(dtype).to(tl.float32)
    y2 = acc2.to(dtype).to(tl.float32)
    is_v = head >= heads + kv_heads
    if QK_NORM:
        if not is_v:
            head_rstd = tl.rsqrt((tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * half) + eps)[:, None]
            is_q = head < heads
            g1 = tl.where(is_q, tl.load(q_norm_ptr + offs_d, mask=d_mask, other=0.0),
                          tl.load(k_norm_ptr + offs_d, mask=d_mask, other=0.0)).to(tl.float32)[None, :]
            g2 = tl.where(is_q, tl.load(q_norm_ptr + half + offs_d, mask=d_mask, other=0.0),
                          tl.load(k_norm_ptr + half + offs_d, mask=d_mask, other=0.0)).to(tl.float32)[None, :]
            y1 = ((y1 * head_rstd).to(dtype).to(tl.float32) * g1).to(dtype).to(tl.float32)
            y2 = ((y2 * head_rstd).to(dtype).to(tl.float32) * g2).to(dtype).to(tl.float32)
    mask = m_mask[:, None] & d_mask[None, :]
    slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    if is_v:
        dst = v_cache_ptr + (slot[:, None] * kv_heads + head - heads - kv_heads) * (2 * half) + offs_d[None, :]
        tl.store(dst, y1.to(dtype), mask=mask)
        tl.store(dst + half, y2.to(dtype), mask=mask)
    else:
        c = tl.load(cos_ptr + offs_m[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0)
        s = tl.load(sin_ptr + offs_m[:, None] * stride_c + offs_d[None, :], mask=mask, other=0.0)
        r1 = (y1 * c - y2 * s).to(dtype)
        r2 = (y2 * c + y1 * s).to(dtype)
        if head < heads:
            dst = q_ptr + offs_m[:, None] * stride_q + head * (2 * half) + offs_d[None, :]
        else:
            dst = k_cache_ptr + (slot[:, None] * kv_heads + head - heads) * (2 * half) + offs_d[None, :]
        tl.store(dst, r1, mask=mask)
        tl.store(dst + half, r2, mask=mask)


def _dot_options(x: torch.Tensor) -> dict[str, str | bool]:
    """float32 models multiply in float32 (tl.dot would otherwise take TF32 on the GPU, which torch's matmul does not).
    On the CPU (Triton's interpreter, which multiplies bfloat16 operands as if they were integers) operands are
    upcast to float32 first: the same products, as a bf16 × bf16 product is exact in float32."""
    upcast = x.device.type == "cpu"
    return {"PRECISION": "ieee" if x.dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def norm_qkv_rope(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention sublayer's input side in one launch: h = x + residual (x alone where residual is None),
    rms_norm(h) · norm_weight projected by qkv_weight [(heads + 2 kv_heads) · head_dim, hidden] (plus qkv_bias; then
    per-head q_norm/k_norm where given), RoPE (cos/sin [rows, head_dim // 2] float32) on the q and k heads, and the
    rotated K and v written to k_cache/v_cache [slots, kv_heads, head_dim] at slots [rows] int64.
    Returns (q [rows, heads, head_dim] rotated, h)."""
    rows, hidden = x.shape
    kv_heads, head_dim = k_cache.shape[1:]
    heads = qkv_weight.shape[0] // head_dim - 2 * kv_heads
    half = head_dim // 2
    assert head_dim % 2 == 0 and qkv_weight.shape == ((heads + 2 * kv_heads) * head_dim, hidden)
    assert x.stride(1) == 1 and qkv_weight.is_contiguous() and norm_weight.shape == (hidden,)
    assert (q_norm is None) == (k_norm is None)
    assert cos.shape == sin.shape == (rows, half) and cos.dtype == sin.dtype == torch.float32
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype == x.dtype
    assert slots.shape == (rows,)
    q = torch.empty(rows, heads, head_dim, dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(x)
    if rows == 0:
        return q, new_residual
    res = x if residual is None else residual  # placeholders: never read without their flag
    assert res.shape == x.shape and res.stride(1) == 1
    _norm_qkv_rope_kernel[(triton.cdiv(rows, BLOCK_M), heads + 2 * kv_heads)](
        x, res, norm_weight, qkv_weight, qkv_bias if qkv_bias is not None else qkv_weight,
        q_norm if q_norm is not None else norm_weight, k_norm if k_norm is not None else norm_weight,
        cos, sin, q, new_residual, k_cache, v_cache, slots,
        rows, hidden, heads, kv_heads, half, eps,
        x.stride(0), res.stride(0), new_residual.stride(0), cos.stride(0), q.stride(0),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=qkv_bias is not None, QK_NORM=q_norm is not None,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_HALF=max(16, triton.next_power_of_2(half)),
        **_dot_options(x), num_warps=4,
    )
    return q, new_residual


@triton.jit
def _norm_gate_up_silu_kernel(
    x_ptr,  # [rows, hidden] the attention's output projection
    res_ptr,  # [rows, hidden] the residual stream
    norm_w_ptr,  # [hidden]
    w_ptr,  # [2 inter, hidden] gate then up projections
    out_ptr,  # [rows, inter] out: silu(gate) · up
    new_res_ptr,  # [rows, hidden] out: x + residual
    rows, hidden, inter, eps,
    stride_x, stride_r, stride_nr, stride_o,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    offs_m = offs_m.to(tl.int64)
    rstd = _normed_rows(x_ptr, res_ptr, new_res_ptr, offs_m, m_mask, stride_x, stride_r, stride_nr, hidden, eps,
                        tl.where(pid_n == 0, rows, 0), True, BLOCK_M, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + offs_k
        a = _normed_chunk(x_ptr, res_ptr, norm_w_ptr, offs_m, m_mask, kk, stride_x, stride_r, rstd, hidden, True)
        w_mask = (kk < hidden)[:, None] & n_mask[None, :]
        w_gate = w_ptr + offs_n[None, :].to(tl.int64) * hidden + kk[:, None]
        wg = tl.load(w_gate, mask=w_mask, other=0.0)
        wu = tl.load(w_gate + inter * hidden, mask=w_mask, other=0.0)
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        gate = tl.dot(a, wg, gate, input_precision=PRECISION)
        up = tl.dot(a, wu, up, input_precision=PRECISION)
    dtype = out_ptr.dtype.element_ty
    # rounded as the reference rounds: the projection's output, then silu(gate), then the product
    g = gate.to(dtype).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
    out = (silu * up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], out, mask=m_mask[:, None] & n_mask[None, :])


_GATE_UP_BLOCK_N = 64


def norm_gate_up_silu(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's input side in one launch: h = x + residual, a = rms_norm(h) · norm_weight, then silu(a · gate^T) ·
    (a · up^T) for gate_up_weight [2 · inter, hidden] (gate rows first). Returns (that [rows, inter], h)."""
    rows, hidden = x.shape
    inter = gate_up_weight.shape[0] // 2
    assert gate_up_weight.shape == (2 * inter, hidden) and gate_up_weight.is_contiguous()
    assert x.stride(1) == 1 and residual.shape == x.shape and residual.stride(1) == 1 and norm_weight.shape == (hidden,)
    out = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x)
    if rows:
        _norm_gate_up_silu_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(inter, _GATE_UP_BLOCK_N))](
            x, residual, norm_weight, gate_up_weight, out, new_residual,
            rows, hidden, inter, eps,
            x.stride(0), residual.stride(0), new_residual.stride(0), out.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=_GATE_UP_BLOCK_N, BLOCK_K=BLOCK_K, **_dot_options(x), num_warps=4,
        )
    return out, new_residual
