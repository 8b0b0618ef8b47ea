"""Triton sparse draft attention: one query per sequence over its selected cache slots plus its recent ones.

A draft reads K/V at explicit slots — the layer's selected positions, then the positions since the
selection's anchor — straight from the paged cache, with no plan on the host: which slots a sequence reads
lives in device tensors (an indptr into the flattened selection, a recent-slot table and a count), so a
chain of drafts can advance on the device, γ replays of one CUDA graph. The torch function of the
same math is `kernels.reference.sparse_attention`; tests compare the two.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Padded query-head tile of one KV head's group; tl.dot needs ≥ 16 rows.
_MIN_ROW_TILE = 16


@triton.jit(do_not_specialize=["recent_width"])
def _sparse_attention_kernel(
    q_ptr,  # [B, heads, head_dim] (any token and head stride)
    k_ptr,  # [slots, kv_heads, head_dim]
    v_ptr,
    out_ptr,  # SPLITS == 1: [B, heads, head_dim] contiguous; else [B, heads, SPLITS, head_dim] float32 partials
    lse_ptr,  # SPLITS > 1: [B, heads, SPLITS] float32, each partial's base-2 log-sum-exp
    selected_ptr,  # flattened selected slots of all sequences
    sel_indptr_ptr,  # [B + 1] where each sequence's selected slots start
    recent_ptr,  # [B, recent_width] slots of the positions after the selection's anchor
    counts_ptr,  # [B] how many of the recent slots the query attends
    recent_width,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROW_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (sequence, KV head, split) attends split's share of the sequence's slots, whole blocks each."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_r = tl.arange(0, ROW_TILE)
    r_valid = offs_r < GROUP
    heads = kv_head * GROUP + offs_r
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=r_valid[:, None], other=0.0)

    sel_start = tl.load(sel_indptr_ptr + seq)
    num_sel = tl.load(sel_indptr_ptr + seq + 1) - sel_start
    total = num_sel + tl.load(counts_ptr + seq)
    share = tl.cdiv(tl.cdiv(total, SPLITS), BLOCK_N) * BLOCK_N
    begin = split * share
    end = tl.minimum(begin + share, total)
    m = tl.full([ROW_TILE], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([ROW_TILE], dtype=tl.float32)
    acc = tl.zeros([ROW_TILE, HEAD_DIM], dtype=tl.float32)
    for start in range(begin, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        in_sel = offs_n < num_sel
        slot_sel = tl.load(selected_ptr + sel_start + offs_n, mask=in_sel, other=0)
        slot_rec = tl.load(recent_ptr + seq * recent_width + (offs_n - num_sel), mask=valid & ~in_sel, other=0)
        slot = tl.where(in_sel, slot_sel, slot_rec).to(tl.int64)
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=valid[:, None], other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        logits = tl.where(valid[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        p = tl.exp2(logits - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    rows = seq * GROUP * tl.num_programs(1) + heads  # (sequence, head) row of the output
    if SPLITS == 1:
        out_rows = out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(out_rows, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=r_valid[:, None])
    else:
        # a split past the sequence's slots attended nothing: weight 0 in the merge (its log-sum-exp is -inf)
        attended = denom > 0
        part = tl.where(attended[:, None], acc / tl.where(attended, denom, 1.0)[:, None], 0.0)
        tl.store(out_ptr + ((rows * SPLITS + split) * HEAD_DIM)[:, None] + offs_d[None, :], part, mask=r_valid[:, None])
        lse = m + tl.log2(tl.where(attended, denom, 1.0))
        tl.store(lse_ptr + rows * SPLITS + split, tl.where(attended, lse, float("-inf")), mask=r_valid)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (sequence, head) weighs its splits' outputs by their share of the softmax's denominator."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + row * SPLITS + offs_s)
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # the first split always attends (every draft attends its own slot)
    part = tl.load(part_ptr + (row * SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :])
    out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


def draft_splits(batch: int, kv_heads: int, num_sms: int) -> int:
    """Splits of each (sequence, KV head)'s slots, a power of two up to 8: the kernel is bound by the latency of its
    gathers, and on the H200 it ran fastest with about three programs per SM (scripts/draft_kernel_probe.py: 8 splits
    at 1 and 16 requests, 2 at 64, none from 128 on, where a split and its merge cost more than they hide)."""
    n = max(1, min(8, 3 * num_sms // (batch * kv_heads)))
    return 1 << (n.bit_length() - 1)


def sparse_draft_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    selected: torch.Tensor,
    sel_indptr: torch.Tensor,
    recent: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
    splits: int = 1,
    block_n: int = 64,
) -> torch.Tensor:
    """Attention of each sequence's one query over selected[sel_indptr[b]:sel_indptr[b+1]] and recent[b, :counts[b]].

    q: [B, heads, d]; k_cache, v_cache: [slots, kv_heads, d]; selected: flattened int slots; sel_indptr:
    [B + 1]; recent: [B, R] int slots; counts: [B] (≥ 1: a draft always attends at least its own slot).
    splits (a power of two): programs that share each (sequence, KV head)'s slots, then one launch merges them
    (`draft_splits` picks it for a batch). Returns [B, heads, d] in q's dtype.
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    assert heads % kv_heads == 0 and head_dim == triton.next_power_of_2(head_dim), "GQA groups, power-of-two head_dim"
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and recent.is_contiguous()
    assert splits == triton.next_power_of_2(splits), "splits: a power of two"
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    part, lse = out, out  # never read with one split
    if splits > 1:
        part = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _sparse_attention_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, part, lse, selected, sel_indptr, recent, counts, recent.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        scale * math.log2(math.e),
        GROUP=group, HEAD_DIM=head_dim, ROW_TILE=max(_MIN_ROW_TILE, triton.next_power_of_2(group)), BLOCK_N=block_n,
        SPLITS=splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        _merge_splits_kernel[(batch * heads,)](part, lse, out, SPLITS=splits, HEAD_DIM=head_dim)
    return out
