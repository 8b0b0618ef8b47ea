"""Triton kernels for the decoder layer's elementwise work: RMSNorm (with the residual add), RoPE with the K/V
cache write, SiLU·up.

In torch each of these is several kernels (an RMSNorm alone is ~8), and a decode step on the GPU is
launch-bound, so each becomes one launch here. The plain-torch references are `rms_norm`,
`add_rms_norm`, `rope_write_kv` and `silu_mul` in engine/model.py; tests compare the two. Math is in
float32; where the torch reference rounds an intermediate to the model dtype, the kernel rounds it
the same way, so both paths agree in bf16 up to reduction order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SILU_BLOCK = 1024  # elements of one row's intermediate per program: intermediate sizes reach ~28k


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


# No kernel takes the row count (the batch size, new every step): it is the grid, so a new batch size never
# recompiles. The strides and sizes they do take are fixed per model, and Triton's specialization on them
# (divisibility by 16) is what lets it vectorize the loads, so they stay specialized.
@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [rows, heads, hidden] (heads = 1 for a hidden-state row)
    res_ptr,  # [rows, hidden] residual stream; unused unless HAS_RESIDUAL
    w_ptr,  # [hidden]
    out_ptr,  # [rows, heads, hidden] normed (may be x itself: each program reads its row before writing)
    new_res_ptr,  # [rows, hidden] x + residual; unused unless HAS_RESIDUAL
    stride_x,
    stride_xh,
    stride_r,
    stride_o,
    stride_oh,
    stride_nr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + head * stride_xh + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # rounded to the model dtype before the norm, like torch's `h = h + delta` that it replaces
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(new_res_ptr + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    # the reference rounds the normed row to the model dtype, then scales by the weight
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + head * stride_oh + offs, (normed * w).to(x.dtype), mask=mask)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor,
    new_residual: torch.Tensor | None,
) -> None:
    x3, out3 = (x, out) if x.dim() == 3 else (x[:, None], out[:, None])
    rows, heads, hidden = x3.shape
    assert x3.stride(2) == 1 and out3.stride(2) == 1 and weight.is_contiguous() and weight.shape == (hidden,)
    if rows == 0:
        return
    res = residual if residual is not None else x  # placeholders: never read without HAS_RESIDUAL
    new_res = new_residual if new_residual is not None else x
    assert res.stride(-1) == 1 and new_res.stride(-1) == 1
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows, heads)](
        x3, res, weight, out3, new_res,
        x3.stride(0), x3.stride(1), res.stride(0), out3.stride(0), out3.stride(1), new_res.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row of x [rows, hidden], or of each head of x [rows, heads, head_dim] (e.g. Qwen3's q/k norm).

    x may be strided except along its last dim; out (same shape) may be x itself for an in-place norm.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x, None, weight, eps, out, None)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) for x [rows, hidden]; residual None means a residual of x alone."""
    assert x.dim() == 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        _launch_rms_norm(x, None, weight, eps, out, None)
        return out, x
    assert residual.shape == x.shape and residual.dtype == x.dtype
    new_residual = torch.empty_like(out)
    _launch_rms_norm(x, residual, weight, eps, out, new_residual)
    return out, new_residual


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_g, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gate_up_ptr + row * stride_g + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_g + inter + offs, mask=mask, other=0.0).to(tl.float32)
    gf = gate.to(tl.float32)
    # torch's F.silu(gate) * up rounds silu(gate) to the model dtype before the product; so does this
    silu = (gf * tl.sigmoid(gf)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (silu * up).to(gate.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 * inter] (gate first, up second): [rows, inter] in gate_up's dtype."""
    rows, two_inter = gate_up.shape
    assert two_inter % 2 == 0 and gate_up.stride(1) == 1
    inter = two_inter // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=_num_warps(block)
    )
    return out


@triton.jit
def _rope_write_kv_kernel(
    qk_ptr,  # [rows, heads + kv_heads, head_dim]: q heads rotated in place, k heads read
    v_ptr,  # [rows, kv_heads, head_dim]
    cos_ptr,  # [rows, head_dim // 2] float32
    sin_ptr,
    k_cache_ptr,  # [slots, kv_heads, head_dim] contiguous
    v_cache_ptr,
    slot_ptr,  # [rows] int64 cache slot of each row's K/V
    stride_t,
    stride_h,
    stride_v,
    stride_c,
    heads,
    kv_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < half
    mask = (offs_h[:, None] < heads + kv_heads) & d_mask[None, :]
    c = tl.load(cos_ptr + row * stride_c + offs_d, mask=d_mask, other=0.0)[None, :]
    s = tl.load(sin_ptr + row * stride_c + offs_d, mask=d_mask, other=0.0)[None, :]
    p1 = qk_ptr + row * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + half, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (x1f * c - x2f * s).to(x1.dtype)
    r2 = (x2f * c + x1f * s).to(x1.dtype)
    # q heads back in place for the attention; k heads only to the cache (the qkv buffer's k is not read again)
    is_q = mask & (offs_h < heads)[:, None]
    tl.store(p1, r1, mask=is_q)
    tl.store(p1 + half, r2, mask=is_q)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    k_dst = k_cache_ptr + (slot * kv_heads + offs_h[:, None] - heads) * (2 * half) + offs_d[None, :]
    is_k = mask & (offs_h >= heads)[:, None]
    tl.store(k_dst, r1, mask=is_k)
    tl.store(k_dst + half, r2, mask=is_k)
    offs_v = tl.arange(0, BLOCK_KV)
    v_mask = offs_v < kv_heads * 2 * half
    v = tl.load(v_ptr + row * stride_v + offs_v, mask=v_mask)
    tl.store(v_cache_ptr + slot * kv_heads * 2 * half + offs_v, v, mask=v_mask)


def rope_write_kv(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """Rotate-half RoPE on the q and k heads of qk [rows, heads + kv_heads, head_dim] (any row/head strides, e.g. the
    fused qkv projection's output), the rotated K and v [rows, kv_heads, head_dim] written to k_cache/v_cache [slots,
    kv_heads, head_dim] at slots [rows] int64, in one launch; cos/sin [rows, head_dim // 2] float32 at each row's
    position. Returns the q heads, rotated in place (qk's k heads are left as they were)."""
    rows, qk_heads, head_dim = qk.shape
    kv_heads = v.shape[1]
    heads, half = qk_heads - kv_heads, head_dim // 2
    assert head_dim % 2 == 0 and qk.stride(2) == 1
    assert v.shape == (rows, kv_heads, head_dim) and v.stride(2) == 1 and v.stride(1) == head_dim, \
        "v's heads contiguous"
    assert cos.shape == sin.shape == (rows, half) and cos.dtype == sin.dtype == torch.float32
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype == qk.dtype
    assert k_cache.shape[1:] == (kv_heads, head_dim) and slots.shape == (rows,)
    if rows:
        _rope_write_kv_kernel[(rows,)](
            qk, v, cos, sin, k_cache, v_cache, slots,
            qk.stride(0), qk.stride(1), v.stride(0), cos.stride(0), heads, kv_heads, half,
            BLOCK_H=triton.next_power_of_2(qk_heads), BLOCK_D=triton.next_power_of_2(half),
            BLOCK_KV=triton.next_power_of_2(kv_heads * head_dim),
        )
    return qk[:, :heads]
