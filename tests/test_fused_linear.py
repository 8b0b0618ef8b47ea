"""The fused projection kernels equal the torch compositions they replace: norm → q/k/v projection → (Qwen3's head
norm) → RoPE → K/V cache write, and norm → gate/up projection → SiLU·up.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); the `gpu` cases run them on CUDA.
Whole-model agreement (these kernels inside a forward) is tests/test_fused_layer.py's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # requirements-test.txt pins it; the `test` extra alone does not

from specattn.engine.model import add_rms_norm, rms_norm, rope_write_kv, silu_mul
from specattn.kernels import fused_linear

EPS = 1e-5
CASES = [
    ("cpu", torch.float32),
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # bf16: a different summation order in the projection can flip a rounding of its output, which RoPE and the
    # products after it carry (and the interpreter rounds float32 -> bf16 toward zero), so a few ulps
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


def _randn(*shape: int, dtype: torch.dtype, device: str, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale + offset).to(device=device, dtype=dtype)


def _rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    return ((out.float() - truth.float()).norm() / truth.float().norm()).item()


def _reference_qkv(x, residual, norm_w, w, bias, q_norm, k_norm, cos, sin, k_cache, v_cache, slots, heads, kv_heads):
    """engine/model.py's torch path for the attention sublayer's input side."""
    normed, new_residual = add_rms_norm(x, residual, norm_w, EPS)
    qkv = F.linear(normed, w, bias)
    rows, head_dim = x.shape[0], k_cache.shape[2]
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
    if q_norm is not None:
        qk = torch.cat([rms_norm(qk[:, :heads], q_norm, EPS), rms_norm(qk[:, heads:], k_norm, EPS)], dim=1)
    return rope_write_kv(qk, v, cos, sin, k_cache, v_cache, slots), new_residual


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize(
    "rows,hidden,heads,kv_heads,head_dim,qwen3",
    [
        (1, 576, 9, 3, 64, False),  # SmolLM2-135M, one decoding request
        (45, 576, 9, 3, 64, False),  # rows over one tile, the last tile part-filled
        (5, 48, 4, 2, 16, True),  # bias and per-head q/k norms; half a head narrower than the smallest tile
        (3, 100, 2, 1, 80, False),  # a head_dim that is no power of two, hidden not a multiple of the K tile
    ],
)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-layer"])
def test_norm_qkv_rope_equals_reference(device, dtype, rows, hidden, heads, kv_heads, head_dim, qwen3, with_residual):
    x = _randn(rows, hidden, dtype=dtype, device=device)
    residual = _randn(rows, hidden, dtype=dtype, device=device, scale=3.0) if with_residual else None
    norm_w = _randn(hidden, dtype=dtype, device=device, scale=0.1, offset=1.0)
    w = _randn((heads + 2 * kv_heads) * head_dim, hidden, dtype=dtype, device=device, scale=hidden**-0.5)
    bias = _randn(w.shape[0], dtype=dtype, device=device, scale=0.5) if qwen3 else None
    q_norm, k_norm = ([_randn(head_dim, dtype=dtype, device=device, scale=0.1, offset=1.0) for _ in range(2)]
                      if qwen3 else (None, None))
    angles = torch.rand(rows, head_dim // 2) * 100
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    num_slots = 3 * rows + 5
    slots = torch.randperm(num_slots)[:rows].to(device)
    caches = [_randn(num_slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    expected = [c.clone() for c in caches]
    ref_q, ref_residual = _reference_qkv(x, residual, norm_w, w, bias, q_norm, k_norm, cos, sin, *expected, slots,
                                         heads, kv_heads)
    q, new_residual = fused_linear.norm_qkv_rope(x, residual, norm_w, EPS, w, bias, q_norm, k_norm, cos, sin, *caches,
                                                 slots)
    assert q.shape == (rows, heads, head_dim) and q.dtype == dtype
    torch.testing.assert_close(q, ref_q, **_tol(dtype))
    if residual is None:
        assert new_residual is x  # the first layer's input starts the residual stream
    else:
        torch.testing.assert_close(new_residual, ref_residual, atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
    # the K and V of these rows at their slots, every other slot as it was
    torch.testing.assert_close(caches[0], expected[0], **_tol(dtype))
    torch.testing.assert_close(caches[1], expected[1], **_tol(dtype))
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots.cpu()] = False
    for cache, ref in zip(caches, expected):
        assert torch.equal(cache[untouched.to(device)], ref[untouched.to(device)])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("rows,hidden,inter", [(1, 576, 1536), (45, 576, 200), (3, 100, 40)])
def test_norm_gate_up_silu_equals_reference(device, dtype, rows, hidden, inter):
    x = _randn(rows, hidden, dtype=dtype, device=device)
    residual = _randn(rows, hidden, dtype=dtype, device=device, scale=3.0)
    norm_w = _randn(hidden, dtype=dtype, device=device, scale=0.1, offset=1.0)
    w = _randn(2 * inter, hidden, dtype=dtype, device=device, scale=2 * hidden**-0.5)
    normed, ref_residual = add_rms_norm(x, residual, norm_w, EPS)
    ref = silu_mul(F.linear(normed, w))
    out, new_residual = fused_linear.norm_gate_up_silu(x, residual, norm_w, EPS, w)
    assert out.shape == (rows, inter) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **_tol(dtype))
    else:
        # silu(gate) · up multiplies two rounded projections: a rounding flipped in either (a different summation
        # order) moves a large product by several ulps, so judge both bf16 results against the float32 computation
        # from the same inputs: the fused one may not be much worse. The interpreter rounds toward zero at each of
        # the kernel's seven roundings, a bias of ≈ 0.3 % each (≈ 2 % in all, against ≈ 0.5 % for torch's rounding
        # to nearest); a wrong kernel is off by ≈ 100 %.
        f32 = [t.float() for t in (x, residual, norm_w, w)]
        normed32, _ = add_rms_norm(f32[0], f32[1], f32[2], EPS)
        truth = silu_mul(F.linear(normed32, f32[3]))
        worse = 2 if device == "cuda" else 6
        assert _rel_err(out, truth) < worse * _rel_err(ref, truth) + 1e-3, (_rel_err(out, truth), _rel_err(ref, truth))
    torch.testing.assert_close(new_residual, ref_residual, atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
