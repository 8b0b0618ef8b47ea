"""Writing a forward's new K and V into the paged cache in one launch (torch needs one index_put per tensor).

Reference: `kernels.reference.write_kv`; tests compare the two. K and V may be row-strided views of the
QKV projection's output, so no copy is made before the write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < width
    dst = tl.load(slot_ptr + row).to(tl.int64) * width + offs
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + row * stride_k + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + row * stride_v + offs, mask=mask), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k_cache[slot_mapping[i]] = k[i] and the same for v. k, v: [tokens, kv_heads, d], each row's heads contiguous;
    k_cache, v_cache: [slots, kv_heads, d] contiguous."""
    tokens, heads, d = k.shape
    for t in (k, v):
        assert t.stride(2) == 1 and t.stride(1) == d, "each token's heads must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k.dtype == k_cache.dtype
    if tokens:
        width = heads * d
        _write_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), width,
                                    BLOCK=triton.next_power_of_2(width))
