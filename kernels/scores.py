"""Triton score extraction: the two scored rows' attention weights over a verification's cached positions.

Verification already computed each row's log-sum-exp (FlashInfer returns it in base 2), so the weights
need only q·K for those two rows: one pass over the scored span of K, no softmax of its own. The torch
function of the same math is `kernels.reference.verification_scores`; tests compare the two.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from specattn.kernels.paging import paged_slots

# Padded length of the query-row tile: 2 rows × the query heads of one KV head; tl.dot needs ≥ 16.
_MIN_ROW_TILE = 16


# sizes that change every step: no per-value specialization, so Triton does not recompile mid-run
@triton.jit(do_not_specialize=["num_seqs", "out_len", "stride_ql", "stride_qs", "stride_ll", "stride_ls"])
def _verification_scores_kernel(
    q_ptr,  # [layers, S, 2, heads, head_dim]: the scored rows' queries
    lse_ptr,  # [layers, S, 2, heads] float32, base 2
    k_ptr,  # [layers, slots, kv_heads, head_dim]: the K cache
    row_pos_ptr,  # [S, 2] int32: position of each scored row (its causal limit)
    page_start_ptr,  # [S] int32: offset of the sequence's first page in page_indices
    page_indices_ptr,  # int32 pages of all sequences, each sequence's in position order
    lengths_ptr,  # [S] int32: positions [0, length) are scored
    out_ptr,  # [layers, S, out_len] float32
    num_seqs,
    out_len,
    stride_ql,
    stride_qs,
    stride_qr,
    stride_qh,
    stride_ll,
    stride_ls,
    stride_lr,
    stride_kl,
    stride_ks,
    stride_kh,
    scale_log2,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROW_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    layer = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    length = tl.load(lengths_ptr + seq)
    n_valid = offs_n < length
    slot = paged_slots(page_indices_ptr, tl.load(page_start_ptr + seq), offs_n, n_valid, PAGE_SIZE)

    # tile row r: scored row r // GROUP, query head (kv_head * GROUP + r % GROUP)
    offs_r = tl.arange(0, ROW_TILE)
    r_valid = offs_r < 2 * GROUP
    which = tl.where(r_valid, offs_r // GROUP, 0)
    limit = tl.load(row_pos_ptr + seq * 2 + which)
    keep = r_valid[:, None] & n_valid[None, :] & (offs_n[None, :] <= limit[:, None])
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + layer * stride_ql + seq * stride_qs + which * stride_qr
    lse_base = lse_ptr + layer * stride_ll + seq * stride_ls + which * stride_lr
    k_base = k_ptr + layer * stride_kl

    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in tl.static_range(KV_HEADS):
        head = g * GROUP + offs_r % GROUP
        q = tl.load(q_base[:, None] + head[:, None] * stride_qh + offs_d[None, :], mask=r_valid[:, None], other=0.0)
        k = tl.load(k_base + slot[:, None] * stride_ks + g * stride_kh + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        lse = tl.load(lse_base + head, mask=r_valid, other=0.0)
        weights = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
        total += tl.sum(tl.where(keep, weights, 0.0), axis=0)
    mean = total / (2 * GROUP * KV_HEADS)
    out = out_ptr + (layer * num_seqs + seq) * out_len + offs_n
    tl.store(out, tl.where(n_valid, mean, -1.0), mask=offs_n < out_len)


def verification_scores_paged(
    q_rows: torch.Tensor,
    lse2_rows: torch.Tensor,
    k_cache: torch.Tensor,
    row_pos: torch.Tensor,
    page_start: torch.Tensor,
    page_indices: torch.Tensor,
    lengths: torch.Tensor,
    page_size: int,
    scale: float,
    out: torch.Tensor,
    block_n: int = 64,
) -> torch.Tensor:
    """Fill out[l, s, j] with the mean weight of sequence s's two scored rows (all heads) on position j in layer l; -1 past its length.

    One launch for all layers. q_rows: [layers, S, 2, heads, d] the scored rows' queries; lse2_rows:
    [layers, S, 2, heads] their base-2 log-sum-exp of scale·q·k over each row's whole causal span (what
    verification returns); k_cache: [layers, slots, kv_heads, d]; row_pos: [S, 2] the rows' positions;
    page_start/page_indices: where each sequence's pages are; lengths: [S] scored span; out:
    [layers, S, out_len] float32.
    """
    layers, num_seqs, _, heads, head_dim = q_rows.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    assert q_rows.stride(4) == 1 and k_cache.stride(3) == 1 and lse2_rows.stride(3) == 1 and out.is_contiguous()
    out_len = out.shape[2]
    if num_seqs == 0:
        return out
    grid = (num_seqs, triton.cdiv(out_len, block_n), layers)
    _verification_scores_kernel[grid](
        q_rows, lse2_rows, k_cache, row_pos, page_start, page_indices, lengths, out,
        num_seqs, out_len,
        q_rows.stride(0), q_rows.stride(1), q_rows.stride(2), q_rows.stride(3),
        lse2_rows.stride(0), lse2_rows.stride(1), lse2_rows.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale * math.log2(math.e),
        PAGE_SIZE=page_size, KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim,
        ROW_TILE=max(_MIN_ROW_TILE, triton.next_power_of_2(2 * group)), BLOCK_N=block_n,
    )
    return out


@triton.jit(do_not_specialize=["num_seqs", "out_len", "num_slots"])
def _gather_slot_scores_kernel(
    slot_scores_ptr,  # [layers, kv_heads, num_slots] float32
    page_start_ptr,  # [S] int32
    page_indices_ptr,
    lengths_ptr,  # [S] int32
    out_ptr,  # [layers, S, out_len] float32
    num_seqs,
    out_len,
    num_slots,
    norm,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    layer = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < tl.load(lengths_ptr + seq)
    slot = paged_slots(page_indices_ptr, tl.load(page_start_ptr + seq), offs_n, n_valid, PAGE_SIZE)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in tl.static_range(KV_HEADS):
        total += tl.load(slot_scores_ptr + (layer * KV_HEADS + g) * num_slots + slot, mask=n_valid, other=0.0)
    out = out_ptr + (layer * num_seqs + seq) * out_len + offs_n
    tl.store(out, tl.where(n_valid, total / norm, -1.0), mask=offs_n < out_len)


def gather_slot_scores(
    slot_scores: torch.Tensor,
    page_start: torch.Tensor,
    page_indices: torch.Tensor,
    lengths: torch.Tensor,
    page_size: int,
    num_heads: int,
    out: torch.Tensor,
    block_n: int = 256,
) -> torch.Tensor:
    """Fill out[l, s, j] from per-slot weights that `verify_attention` kept: the mean weight of sequence s's
    two scored rows (all heads) on position j in layer l, as `verification_scores_paged` computes it; -1 past its length.

    slot_scores: [layers, kv_heads, slots] each KV head's sum over the two rows and its query heads;
    page_start/page_indices: where each sequence's pages are; lengths: [S]; out: [layers, S, out_len] float32.
    """
    layers, kv_heads, num_slots = slot_scores.shape
    num_seqs, out_len = out.shape[1], out.shape[2]
    assert slot_scores.is_contiguous() and out.is_contiguous()
    if num_seqs == 0:
        return out
    grid = (num_seqs, triton.cdiv(out_len, block_n), layers)
    _gather_slot_scores_kernel[grid](
        slot_scores, page_start, page_indices, lengths, out, num_seqs, out_len, num_slots, float(2 * num_heads),
        PAGE_SIZE=page_size, KV_HEADS=kv_heads, BLOCK_N=block_n,
    )
    return out
