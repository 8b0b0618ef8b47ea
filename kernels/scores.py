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

# Padded length of the query-row tile: 2 rows × the query heads of one KV head; tl.dot needs ≥ 16.
_MIN_ROW_TILE = 16


@triton.jit
def _verification_scores_kernel(
    q_ptr,  # [tokens, heads, head_dim]
    k_ptr,  # [slots, kv_heads, head_dim]: one layer's K cache
    lse_ptr,  # [tokens, heads] float32, base 2
    rows_ptr,  # [S, 2] int32: token index of each scored row
    row_pos_ptr,  # [S, 2] int32: position of each scored row (its causal limit)
    page_start_ptr,  # [S] int32: offset of the sequence's first page in page_indices
    page_indices_ptr,  # int32 pages of all sequences, each sequence's in position order
    lengths_ptr,  # [S] int32: positions [0, length) are scored
    out_ptr,  # [S, out_len] float32
    out_len,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_lt,
    scale_log2,
    PAGE_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROW_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    length = tl.load(lengths_ptr + seq)
    n_valid = offs_n < length
    page = tl.load(page_indices_ptr + tl.load(page_start_ptr + seq) + offs_n // PAGE_SIZE, mask=n_valid, other=0)
    slot = page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE

    # tile row r: scored row r // GROUP, query head (kv_head * GROUP + r % GROUP)
    offs_r = tl.arange(0, ROW_TILE)
    r_valid = offs_r < 2 * GROUP
    which = tl.where(r_valid, offs_r // GROUP, 0)
    token = tl.load(rows_ptr + seq * 2 + which).to(tl.int64)
    limit = tl.load(row_pos_ptr + seq * 2 + which)
    keep = r_valid[:, None] & n_valid[None, :] & (offs_n[None, :] <= limit[:, None])
    offs_d = tl.arange(0, HEAD_DIM)

    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in tl.static_range(KV_HEADS):
        head = g * GROUP + offs_r % GROUP
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=r_valid[:, None], other=0.0)
        k = tl.load(k_ptr + slot[:, None] * stride_ks + g * stride_kh + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        lse = tl.load(lse_ptr + token * stride_lt + head, mask=r_valid, other=0.0)
        weights = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
        total += tl.sum(tl.where(keep, weights, 0.0), axis=0)
    mean = total / (2 * GROUP * KV_HEADS)
    tl.store(out_ptr + seq * out_len + offs_n, tl.where(n_valid, mean, -1.0), mask=offs_n < out_len)


def verification_scores_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    lse2: torch.Tensor,
    rows: torch.Tensor,
    row_pos: torch.Tensor,
    page_start: torch.Tensor,
    page_indices: torch.Tensor,
    lengths: torch.Tensor,
    page_size: int,
    scale: float,
    out: torch.Tensor,
    block_n: int = 64,
) -> torch.Tensor:
    """Fill out[s, j] with the mean weight of sequence s's two scored rows (all heads) on position j; -1 past its length.

    q: [tokens, heads, d] this layer's queries; k_cache: [slots, kv_heads, d]; lse2: [tokens, heads] base-2
    log-sum-exp of scale·q·k over each row's whole causal span (what verification returns); rows, row_pos:
    [S, 2] token index and position of the scored rows; page_start/page_indices: where each sequence's pages
    are; lengths: [S] scored span; out: [S, out_len] float32.
    """
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and lse2.stride(1) == 1 and out.is_contiguous()
    num_seqs, out_len = out.shape
    if num_seqs == 0:
        return out
    grid = (num_seqs, triton.cdiv(out_len, block_n))
    _verification_scores_kernel[grid](
        q, k_cache, lse2, rows, row_pos, page_start, page_indices, lengths, out,
        out_len, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), lse2.stride(0),
        scale * math.log2(math.e),
        PAGE_SIZE=page_size, KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim,
        ROW_TILE=max(_MIN_ROW_TILE, triton.next_power_of_2(2 * group)), BLOCK_N=block_n,
    )
    return out
